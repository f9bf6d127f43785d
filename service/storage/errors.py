"""The storage errors the service maps to statuses (service/errors.py): 409, 422 and 500."""

from __future__ import annotations

from adapters import AdapterError

__all__ = ["AdapterExistsError", "InvalidAdapterNameError", "MissingBlobError", "ForeignStoreError"]


class AdapterExistsError(AdapterError):
    """The name is taken and overwrite was not asked for (409)."""


class InvalidAdapterNameError(AdapterError):
    """The name does not match NAME_PATTERN, or is reserved (422)."""


class MissingBlobError(AdapterError):
    """An index row points at a blob that is not in the blob store: the store was damaged outside the service
    (files deleted by hand, a restore of the index without its blobs). Answered as 500, never as 404: the name
    exists, its bytes do not. Deleting the name (or uploading it again with overwrite) repairs it."""


class ForeignStoreError(RuntimeError):
    """The store was claimed by another base model; the server refuses to start on it."""
