"""Cluster mode: the same HTTP API over several engine replicas on Ray Serve (`lora-serve --replicas 2`).

    HTTP ─► Serve proxy ─► LoraIngress (service/routes as they are; EngineDep = ClusterEngine, a proxy)
                               │ resolve model -> (name, sha256) in the shared store
                               ▼ handle.options(multiplexed_model_id="name@sha256")
                           AdapterAffinityRouter (rendezvous hash; a hot adapter on several replicas)
                               ▼
                           LoraReplica × N (load_base_model + Engine, each its own caches and merge policy)

Modules, one job each: `affinity` (adapter keys and the hashing, no Ray), `store_view` (the only code that
knows today's store API, and the pins record), `routing` (the Ray request routers), `replica` and `ingress`
(the two deployments), `proxy` (the engine-like object the routes call), `metrics_merge`, `launch`.
Importing this package does not import ray; `launch`, `routing`, `replica` and `ingress` do.
"""
