"""Data files: every bad row is reported with its own line number, in JSONL and CSV, and the CLI
exits non-zero before any model is loaded."""

from __future__ import annotations

import json

import pytest

from lora_train.cli import main
from lora_train.data import DataError, label_names, load_rows
from lora_train.tasks import Example, collate


def test_jsonl_bad_rows_are_all_listed_with_line_numbers(tmp_path):
    lines = [
        json.dumps({"text": "good row", "label": "pos"}),  # 1
        "{not json",  # 2
        json.dumps({"text": "no label"}),  # 3
        "",  # 4: blank lines are skipped, not errors
        json.dumps({"text": "   ", "label": "neg"}),  # 5
        json.dumps({"text": "float label", "label": 0.5}),  # 6
        json.dumps({"text": ["a list"], "label": "pos"}),  # 7
        json.dumps(["not", "an", "object"]),  # 8
        json.dumps({"text": "fine too", "label": 1}),  # 9
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_rows(path, "classify")
    assert info.value.line_numbers == [2, 3, 5, 6, 7, 8]
    message = str(info.value)
    for fragment in ("line 2: not valid JSON", "line 3: missing field 'label'", "line 5: field 'text' is empty",
                     "line 6: field 'label' must be a string or an integer, got float",
                     "line 7: field 'text' must be a string", "line 8: expected a JSON object"):
        assert fragment in message


def test_csv_rows_header_and_quoting(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('text,label\n"hello, world",pos\nshort\n,neg\nok,neg,extra\nfine,neg\n')
    with pytest.raises(DataError) as info:
        load_rows(path, "classify")
    assert info.value.line_numbers == [3, 4, 5]
    assert "line 3: missing field 'label'" in str(info.value)
    assert "line 4: field 'text' is empty" in str(info.value)
    assert "line 5: more fields than the header" in str(info.value)

    path.write_text("sentence,label\nhello,pos\n")
    with pytest.raises(DataError, match="lacks text"):
        load_rows(path, "classify")

    path.write_text('text,label\n"hello, world",pos\nbye,neg\n')
    data = load_rows(path, "classify")
    assert data.column("text") == ["hello, world", "bye"] and data.lines == [2, 3]


def test_eval_labels_must_exist_in_training(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "pos"}) + "\n" + json.dumps({"text": "b", "label": "meh"}) + "\n")
    with pytest.raises(DataError) as info:
        load_rows(path, "classify", known_labels=["neg", "pos"])
    assert info.value.line_numbers == [2] and "'meh' does not occur in the training data" in str(info.value)


def test_labels_sort_numerically_when_integers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": "t", "label": v}) + "\n" for v in (10, 2, 1)))
    assert label_names(load_rows(path, "classify")) == ["1", "2", "10"]


def test_generate_rows_and_prompt_masking(tmp_path):
    path = tmp_path / "gen.jsonl"
    path.write_text(json.dumps({"prompt": "", "completion": "x"}) + "\n"
                    + json.dumps({"prompt": "p", "completion": ""}) + "\n")
    with pytest.raises(DataError) as info:
        load_rows(path, "generate")
    assert info.value.line_numbers == [2]  # an empty prompt is fine, an empty completion is not
    batch = collate([Example([5, 6, 7, 8], prompt_len=2), Example([5, 9], prompt_len=1)], "generate", pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [-100, 9, -100, -100]]  # prompt and padding masked


def test_cli_reports_bad_rows_and_exits_non_zero(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "ok", "label": "pos"}) + "\n" + '{"text": "x"}\n' + "{broken\n")
    code = main(["--data", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "2 bad rows" in err and "line 2: missing field 'label'" in err and "line 3: not valid JSON" in err
    assert not (tmp_path / "out").exists()  # nothing was trained or written


def test_cli_refuses_upload_without_name(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--data", "x.jsonl", "--out", str(tmp_path), "--upload", "http://127.0.0.1:1"])
    assert info.value.code == 2


def test_raw_line_separator_inside_a_json_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "one\u2028two", "label": "a"}, ensure_ascii=False) + "\r\n"
                    + json.dumps({"text": "three", "label": "b"}) + "\r\n", newline="")
    data = load_rows(path, "classify")
    assert data.column("text") == ["one\u2028two", "three"] and data.lines == [1, 2]


def test_non_utf8_files_and_csv_syntax_errors_name_their_line(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: not UTF-8 \(byte 0xe9 at column 14\)") as err:
        load_rows(latin, "classify")
    assert str(latin) in str(err.value)
    bad = tmp_path / "strict.csv"
    bad.write_text('text,label\na,pos\nb,neg\nc,pos\nd,"ne"g\ne,pos\n')
    with pytest.raises(DataError) as err:
        load_rows(bad, "classify")
    assert err.value.line_numbers == [5]


@pytest.mark.parametrize(("flags", "message"), [
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--alpha", "0"], "--alpha must be a positive number"),
    (["--warmup", "2"], "--warmup is a fraction"),
    (["--task", "embed", "--batch-size", "1"], "in-batch negatives"),
    (["--upload", "notaurl", "--name", "x"], "http:// or https://"),
    (["--upload", "http://127.0.0.1:1", "--name", "a/b"], "adapter names must match"),
    (["--upload", "http://127.0.0.1:1", "--name", "base"], "reserved for the bare base model"),  # the service's rule
])
def test_cli_refuses_bad_flags_before_loading_anything(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        main(["--data", "x.jsonl", "--out", str(tmp_path / "out"), *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_cli_refuses_an_out_path_blocked_by_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    for out in ("afile", "afile/sub"):
        with pytest.raises(SystemExit) as info:
            main(["--data", "x.jsonl", "--out", str(tmp_path / out)])
        assert info.value.code == 2 and "is not a directory" in capsys.readouterr().err


def test_embed_batches_never_leave_a_row_alone():
    from lora_train.tasks import batch_spans

    assert batch_spans(33, 16, "embed") == [(0, 16), (16, 33)]
    assert batch_spans(33, 16, "classify") == [(0, 16), (16, 32), (32, 33)]
    assert batch_spans(32, 16, "embed") == [(0, 16), (16, 32)]


def test_python_m_lora_train_help():
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-m", "lora_train", "--help"], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "lora-train" in proc.stdout and "--base-model" in proc.stdout
