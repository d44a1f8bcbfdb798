"""Hostile input to the rules behind the API, without a deployment: each is refused with a 4xx naming
the field (and the range or the ceiling), never an exception that would be a 500, and an error never
echoes more than an excerpt of what was sent."""

from __future__ import annotations

import base64
import gzip
import json

import pytest
from pydantic import ValidationError

from app.cli.api_client import check_dataset
from app.errors import Invalid, NotFound
from app.jobs import service
from app.jobs.admission import admit
from app.jobs.lineage import check_lora_shape
from app.jobs.schemas import MAX_EVAL_PROMPT_CHARS
from app.jobs.tables import Job
from app.models.tables import RegisteredModel
from app.openai import translate
from app.pagination import MAX_ID
from tests.fast.conftest import job_spec, make_settings
from tests.model_configs import LLAMA3_8B
from worker.training.spec import JobSpec, SpecError

HUGE = "h" * (2 * 1024 * 1024)
LLAMA = RegisteredModel(name="llama-3-8b", hub_id="meta-llama/Meta-Llama-3-8B", revision="main", config=LLAMA3_8B)


def test_the_cli_local_check_names_a_line_json_cannot_read(tmp_path):
    """`qlora datasets check` runs the server's ingest: the same verdict, not a traceback."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": ' + b"[" * 100_000 + b"}\n" + b'{"text": 1' + b"0" * 5000 + b"}\n")
    check = check_dataset(path)
    assert check.rows == 1 and check.error_count == 2
    assert [e.line for e in check.errors] == [2, 3]
    assert "nested too deeply" in check.errors[0].message and "a number too long" in check.errors[1].message


def test_a_row_past_the_line_limit_is_a_bad_line_and_the_rows_around_it_count(tmp_path):
    """A row of 4 MiB or more (a million tokens) is a broken file, not a long chat: tokenizing it would hold
    gigabytes in the preflight and training processes. It is reported by its number, not read."""
    from app.datasets.service import MAX_LINE_BYTES

    path = tmp_path / "data.jsonl"
    long_row = b'{"text": "' + b"w " * (MAX_LINE_BYTES // 2) + b'"}'
    path.write_bytes(b'{"text": "ok"}\n' + long_row + b'\n{"text": "fine"}\n')
    check = check_dataset(path)
    assert check.rows == 2 and [e.line for e in check.errors] == [2]
    assert "longer than 4.0 MiB" in check.errors[0].message


@pytest.mark.parametrize(("data", "says"), [
    # json.dump(rows, f): the whole dataset on one line, past the line limit, was "line 1: line is longer than 4.0 MiB".
    (json.dumps([{"text": "w " * 1000}] * 3000).encode(), "the file is one JSON array, not JSONL"),
    (b"\xef\xbb\xbf" + json.dumps([{"text": "w " * 1000}] * 3000).encode() + b"\n", "the file is one JSON array"),
    (json.dumps([{"text": "w " * 1000}] * 3000).encode("utf-16"), "the file is UTF-16"),
])
def test_a_first_line_past_the_line_limit_that_is_no_jsonl_says_what_the_file_is(tmp_path, data, says):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    check = check_dataset(path)
    assert check.error_count == 1 and check.errors[0].line == 1 and says in check.errors[0].message, check.errors


# ------------------------------------------------------------------ echoes are excerpts


def test_a_spec_error_echoes_an_excerpt_of_the_value_and_of_an_unknown_field():
    with pytest.raises(SpecError) as refused:
        JobSpec.parse({"base_model": "m", "training": {"max_steps": 1, "lr_scheduler": HUGE}, HUGE: 1})
    assert len(str(refused.value)) < 1000
    fields = dict(refused.value.errors)
    assert "2,097,152 characters" in fields["training.lr_scheduler"]
    assert any(field.startswith("hhhh") and "2,097,152 characters" in field for field in fields)


@pytest.mark.parametrize("section, value", [("training", [1, 2]), ("lora", 16), ("training", "max_steps=10")])
def test_a_section_that_is_no_object_names_its_fields_not_a_class(section, value):
    spec = {"base_model": "m", "training": {"max_steps": 1}, section: value}
    with pytest.raises(SpecError) as refused:
        JobSpec.parse(spec)
    message = dict(refused.value.errors)[section]
    assert message.startswith("must be an object with fields among ") and "Spec" not in message, message
    assert ("max_steps" if section == "training" else "r, alpha") in message and str(value)[:5] in message


@pytest.mark.parametrize("body", [
    {"hyperparameters": {"n_epochs": HUGE}}, {"hyperparameters": {"batch_size": HUGE}},
    {"hyperparameters": {"learning_rate_multiplier": HUGE}}, {"method": {"type": HUGE}}, {HUGE: 1},
    {"training_file": HUGE},  # no "file-" prefix: as missing as a wrong id
])
def test_an_openai_error_echoes_an_excerpt(body):
    with pytest.raises((Invalid, NotFound)) as refused:
        translate.job_body({"model": "m", "training_file": "file-x", **body})
    assert len(refused.value.message) < 300 and len(json.dumps(refused.value.details)) < 300


def test_a_multiplier_too_large_for_a_float_is_out_of_range_not_an_overflow():
    with pytest.raises(Invalid) as refused:
        translate.job_body({"model": "m", "training_file": "file-x",
                            "hyperparameters": {"learning_rate_multiplier": 10**400}})
    assert refused.value.details[0]["field"] == "hyperparameters.learning_rate_multiplier"


# ------------------------------------------------------------------ paging parameters


@pytest.mark.parametrize("inside", [
    json.dumps(["2024-05-01T12:00:00", "x"]).encode(),  # no timezone: the database layer refuses naive times
    json.dumps(["0001-01-01T00:00:00+05:00", "x"]).encode(),  # before year 1 once in UTC
    b"[" * 100_000,
    json.dumps([1, "x"]).encode(),
])
def test_a_forged_cursor_is_invalid_naming_the_cursor(session, caller, inside):
    cursor = base64.urlsafe_b64encode(inside).decode()
    with pytest.raises(Invalid) as refused:
        service.list_page(session, caller, None, cursor, 10)
    assert refused.value.details == [{"field": "cursor", "message": "not a cursor this API returned"}]


@pytest.mark.parametrize("after", ["ftevent-²", "ftevent-١٢", "ftevent-" + "9" * 5000, f"ftevent-{MAX_ID + 1}",
                                   "ftevent-", "ftevent- 1", "ftjob-1", "ftevent-" + HUGE])
def test_an_openai_event_cursor_must_be_an_event_id(after):
    with pytest.raises(Invalid) as refused:
        translate.event_id(after)
    assert refused.value.details == [{"field": "after", "message": "not an event id"}]
    assert len(refused.value.message) < 300


def test_an_openai_event_cursor_reads_back_as_its_id():
    assert translate.event_id(f"ftevent-{MAX_ID}") == MAX_ID and translate.event_id("ftevent-7") == 7


# ------------------------------------------------------------------ job fields


def native(**fields) -> dict:
    return {"dataset_id": "d" * 32, "base_model": "m", "training": {"max_steps": 1}, **fields}


@pytest.mark.parametrize(("fields", "field"), [
    ({"validation_dataset_id": ""}, "validation_dataset_id"),
    ({"name": "two\nlines"}, "name"),
    ({"name": "nul\x00"}, "name"),
    ({"name": "del\x7f"}, "name"),
    ({"name": "invoice\u202egpj.exe"}, "name"),  # shown as "invoiceexe.jpg"
    ({"name": "a\u2066b"}, "name"),
])
def test_job_fields_a_database_or_a_header_cannot_hold_are_invalid(fields, field):
    with pytest.raises(Invalid) as refused:
        service.parse_create(native(**fields))
    assert [d["field"] for d in refused.value.details] == [field]


def test_a_name_in_any_script_is_a_name():
    meta, _ = service.parse_create(native(name="модель «v2» 数据 👩‍💻"))
    assert meta["name"] == "модель «v2» 数据 👩‍💻"
    rtl = "\u05de\u05d5\u05d3\u05dc\u200f v2 \u0645\u062f\u0644\u200c"  # Hebrew, an RLM mark, Arabic, a ZWNJ
    assert service.parse_create(native(name=rtl))[0]["name"] == rtl


def test_an_empty_openai_validation_file_is_refused():
    with pytest.raises(Invalid) as refused:
        translate.job_body({"model": "m", "training_file": "file-x", "validation_file": ""})
    assert refused.value.details[0]["field"] == "validation_file"


# ------------------------------------------------------------------ GPU classes


def test_without_classes_configured_only_the_default_and_the_extra_classes_are_served(tmp_path):
    settings = make_settings(tmp_path, extra_gpu_classes=["a100"])
    assert settings.served_gpu_classes == ["default", "a100"]
    assert admit(settings, LLAMA, job_spec(), "a100").gpu_class == "a100"
    with pytest.raises(Invalid) as refused:
        admit(settings, LLAMA, job_spec(), "h100")
    assert "'h100' is not a class the workers serve (default, a100)" in refused.value.message
    assert refused.value.details == [{"field": "gpu_class", "message": "unknown GPU class"}]


def test_an_extra_class_beside_sized_ones_is_admitted_unchecked(tmp_path):
    settings = make_settings(tmp_path, gpu_classes={"l4": 24}, default_gpu_class="l4", extra_gpu_classes=["new"])
    assert settings.served_gpu_classes == ["l4", "new"]
    admitted = admit(settings, LLAMA, job_spec(per_device_batch_size="auto"), "new")
    assert admitted.gpu_class == "new" and admitted.estimate is None
    assert admitted.note == "memory not checked: QLORA_GPU_CLASSES gives no memory for new"


def test_the_default_class_must_be_one_the_workers_serve(tmp_path):
    with pytest.raises(ValidationError, match=r"QLORA_DEFAULT_GPU_CLASS 'default' is not one of the GPU classes "
                                              r"workers serve \(l4, h100\)"):
        make_settings(tmp_path, gpu_classes={"l4": 24, "h100": 80})
    assert make_settings(tmp_path, gpu_classes={"l4": 24}, default_gpu_class="l4").served_gpu_classes == ["l4"]
    assert make_settings(tmp_path, gpu_classes={"l4": 24}, extra_gpu_classes=["default"]).default_gpu_class == "default"


# ------------------------------------------------------------------ operator ceilings


CEILINGS = {"max_seq_length": 1024, "max_steps": 500, "max_micro_batch": 8}


@pytest.mark.parametrize("classes", [{}, {"l4": 24, "h100": 80}])
def test_ceilings_refuse_a_spec_over_them_naming_field_and_ceiling(tmp_path, classes):
    settings = make_settings(tmp_path, gpu_classes=classes, default_gpu_class="l4" if classes else "default",
                             **CEILINGS)
    standard = dict(activation_offload=False, tiled_mlp=False)  # as the user set them, so admission leaves them be
    spec = job_spec(max_steps=501, max_seq_length=2048, per_device_batch_size=16, **standard)
    with pytest.raises(Invalid) as refused:
        admit(settings, LLAMA, spec, None)
    assert refused.value.status == 422 and refused.value.code == "invalid_job"
    assert refused.value.details == [
        {"field": "training.max_steps", "message": "at most 500 on this service (QLORA_MAX_STEPS)"},
        {"field": "training.max_seq_length", "message": "at most 1024 on this service (QLORA_MAX_SEQ_LENGTH)"},
        {"field": "training.per_device_batch_size", "message": "at most 8 on this service (QLORA_MAX_MICRO_BATCH)"}]
    at_the_ceiling = job_spec(max_steps=500, max_seq_length=1024, per_device_batch_size=8, **standard)
    assert admit(settings, LLAMA, at_the_ceiling, None).spec == at_the_ceiling


def test_auto_is_sized_no_larger_than_the_micro_batch_ceiling(tmp_path):
    settings = make_settings(tmp_path, gpu_classes={"h100": 80}, default_gpu_class="h100", max_micro_batch=3)
    admitted = admit(settings, LLAMA, job_spec(per_device_batch_size="auto", max_seq_length=512), None)
    assert admitted.spec.training.per_device_batch_size == 3


def test_an_openai_batch_size_is_split_under_the_micro_batch_ceiling():
    body = {"model": "m", "training_file": "file-x", "hyperparameters": {"batch_size": 16}}
    training = translate.job_body(body, max_micro_batch=2)["training"]
    assert (training["per_device_batch_size"], training["gradient_accumulation_steps"]) == (2, 8)


def test_every_route_that_takes_a_json_body_parses_it_as_the_database_reads_it_back():
    """app/routing.py: a route on a router made without route_class=CheckedJSONRoute would take a lone
    surrogate escape into a row no read could load again."""
    import importlib
    import pkgutil

    from fastapi import APIRouter
    from fastapi.routing import APIRoute

    import app
    from app.routing import CheckedJSONRoute

    routes = []
    for module in pkgutil.walk_packages(app.__path__, "app."):
        if module.name.endswith(".routes"):
            router = getattr(importlib.import_module(module.name), "router", None)
            if isinstance(router, APIRouter):
                routes += [r for r in router.routes if isinstance(r, APIRoute) and r.body_field is not None]
    assert len(routes) >= 5  # POST /jobs, /jobs/preflight, /models, /v1/fine_tuning/jobs, the quota's PUT...
    assert [r.path for r in routes if not isinstance(r, CheckedJSONRoute)] == []


@pytest.mark.parametrize(("field", "value"), [("name", "a\x00b"), ("name", "llama\u202e"), ("path", "/models/a\x00b"),
                                              ("hub_id", "org/m\n"),
                                              ("revision", "r" * 101), ("description", "x\x00"), ("hub_id", "h" * 301)])
def test_a_model_registration_with_a_nul_or_past_its_column_is_refused_naming_the_field(field, value):
    from app.models.schemas import ModelIn

    with pytest.raises(ValidationError) as caught:
        ModelIn.model_validate({"name": "m", **{field: value}})
    assert caught.value.errors()[0]["loc"] == (field,)


@pytest.mark.parametrize(("hub_id", "revision", "field"), [
    ("../../x", "main", "hub_id"), ("/etc/passwd", "main", "hub_id"), ("org/../x", "main", "hub_id"),
    ("org/x/y", "main", "hub_id"), ("org/\uff58", "main", "hub_id"), ("org/" + "x" * 97, "main", "hub_id"),
    ("org--x/y", "main", "hub_id"), ("org/.x", "main", "hub_id"), ("org/x.git", "main", "hub_id"),
    ("org/x", "../../../../tmp/x", "revision"), ("org/x", "/tmp/x", "revision"), ("org/x", "a//b", "revision"),
    ("org/x", "v1..2", "revision")])
def test_a_hub_id_or_revision_that_could_name_a_path_is_refused_at_registration(session, tmp_path, hub_id, revision,
                                                                               field):
    """Both were registered as given (201); the worker handed them to snapshot_download after the job's wait in the
    queue, which joins the revision into its cache's paths."""
    from app.models import service as models

    with pytest.raises(Invalid) as caught:
        models.add_model(session, "hub-model", roots=[tmp_path], hub_id=hub_id, revision=revision)
    assert [d["field"] for d in caught.value.details] == [field]
    for fine in ("main", "refs/pr/1", "v1.0", "0123456789abcdef0123456789abcdef01234567"):
        assert models.add_model(session, f"m-{fine}", roots=[tmp_path], hub_id="meta-llama/Llama-3.1-8B", revision=fine)


@pytest.mark.parametrize("hub_id", [
    # validate_repo_id's own examples, valid ("foo"...) and not ("datasets/foo/bar"...); ids the hub serves
    "foo", "foo/bar", "123", "Foo-BAR_foo.bar123", "datasets/foo/bar", ".repo_id", "foo--bar", "foo.git",
    "gpt2", "org/name_", "org_/name", "_org/name", "org/" + "n" * 60, "o" * 96 + "/" + "n" * 96, "org/" + "n" * 97,
    "org/name-", "org/-name", "org/na..me", "org/a.b-c_d", "a/b", "/name", "org/", "org//name", "../name", "org/..",
    "org/.", "org/name.", "org/name/", "org name/x", "org/na+me"])
def test_a_hub_id_is_taken_exactly_when_the_hub_takes_it(hub_id):
    """The rule refused ids the hub takes (`gpt2`, `org/name_`, `org_/name`, a name of 60 characters after its org),
    and the worker applies it to models registered before it: their jobs failed. The hub's own check decides."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from app.models.service import hub_source_problems

    try:
        validate_repo_id(hub_id)
        hub_takes = True
    except HFValidationError:
        hub_takes = False
    assert (hub_source_problems(hub_id, "main") == []) == hub_takes


@pytest.mark.parametrize(("text", "says"), [
    ('{"rope_theta": NaN, ', "finite number"), ('{"rope_theta": Infinity, ', "finite number"),
    ('{"name": "\\udc80", ', "not a readable JSON file"), ('{"x": ' + "[" * 300 + "]" * 300 + ", ", "not a readable JSON"),
    ('{"pad": "' + "x" * (1024 * 1024) + '", ', "not a readable JSON file")])
def test_a_model_config_json_the_registry_cannot_keep_is_refused_not_a_500(session, tmp_path, text, says):
    """A config.json read from the model's directory bypassed the checks a request body gets: NaN and Infinity
    failed the insert on Postgres, a lone surrogate or nesting past the database reader's limit failed it or every
    later read of the registry (GET /models for every team), and any size was kept and served."""
    from app.models import service as models

    (tmp_path / "m").mkdir()
    shape = json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                        "intermediate_size": 128, "vocab_size": 256})
    (tmp_path / "m" / "config.json").write_text(text + shape[1:])
    with pytest.raises(Invalid, match=says):
        models.add_model(session, "hostile", roots=[tmp_path], path=str(tmp_path / "m"))
    assert models.list_models(session) == []


@pytest.mark.parametrize(("fields", "says"), [({"model_type": ["llama"]}, "'model_type' must be a string"),
                                              ({"num_key_value_heads": 3}, "must be a multiple of its 'num_key_value_heads'"),
                                              ({"num_key_value_heads": 8}, "must be a multiple of its 'num_key_value_heads'")])
def test_a_model_config_of_a_wrong_type_or_impossible_shape_is_refused_naming_config(session, tmp_path, fields, says):
    """A model_type that is no string was a TypeError (500) at registration, and at each job's admission on a model
    registered so; key/value heads that do not divide the query heads were registered, and the job failed at its
    first step on the worker, after its wait."""
    from app.models import service as models

    config = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "intermediate_size": 128, "vocab_size": 256, **fields}
    with pytest.raises(Invalid, match=says) as caught:
        models.add_model(session, "odd", roots=[tmp_path], hub_id="org/odd", revision="main", config=config)
    assert [d["field"] for d in caught.value.details] == ["config"]


@pytest.mark.parametrize("linked", ["config.json", "tokenizer.json"])
def test_a_model_file_linked_out_of_the_model_roots_is_refused(session, tmp_path, linked):
    """The directory's own link was checked, not its files': a config.json linked to any JSON object of the API
    host was read, kept and served by GET /models to every team (a tokenizer file likewise kept)."""
    from app.models import service as models

    root, blobs = tmp_path / "root", tmp_path / "root" / "blobs"
    (root / "m").mkdir(parents=True)
    blobs.mkdir()
    shape = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
             "intermediate_size": 128, "vocab_size": 256}
    (tmp_path / "secret.json").write_text(json.dumps({**shape, "token": "s3cr3t"}))
    (blobs / "config").write_text(json.dumps(shape))
    (blobs / "tokenizer").write_text("{}")
    for name in ("config.json", "tokenizer.json"):  # as a hub cache's snapshot links its blobs: fine
        (root / "m" / name).symlink_to(blobs / name.removesuffix(".json"))
    assert models.add_model(session, "linked-inside", roots=[root], path=str(root / "m")).config == shape
    (root / "m" / linked).unlink()
    (root / "m" / linked).symlink_to(tmp_path / "secret.json")
    with pytest.raises(Invalid, match=f"has a {linked} that leads out of the model roots") as caught:
        models.add_model(session, "linked-out", roots=[root], path=str(root / "m"))
    assert [d["field"] for d in caught.value.details] == ["path"]


def test_a_file_sent_under_another_field_name_is_named_not_refused_as_a_large_form(client):
    """`curl -F data=@train.jsonl` held the file as a plain field's value: past 64 KiB it answered 413, "the form's
    fields and part headers are over 64.0 KiB in all" (the demo's 69 KB train.jsonl did), and under it "no file"."""
    data = b'{"text": "the cow says moo"}\n' * 4000  # 120 KB
    for path, form in (("/datasets", {}), ("/v1/files", {"purpose": "fine-tune"})):
        for size in (len(data), 100):
            response = client.post(path, files={"data": ("train.jsonl", data[:size])}, data=form)
            assert response.status_code in (400, 422), (path, size, response.text)
            said = response.json()["error"]["message"]
            assert "no file in the multipart field 'file': the file came as the field 'data'; send it as 'file'" in said
    assert client.get("/datasets").json()["data"] == []
    # An HTML form's other file input left empty is no file: a browser sends it as filename="" with no bytes
    # (httpx leaves an empty filename out, so the body is written here), and the upload goes through.
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="train.jsonl"\r\n\r\n' + data[:3000]
            + b'\r\n--b\r\nContent-Disposition: form-data; name="notes"; filename=""\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n\r\n--b--\r\n")
    made = client.post("/datasets", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert made.status_code == 201, made.text


def test_a_file_named_in_the_extended_form_is_that_file_under_that_name(client):
    """A client that sends a name that is not ASCII as `filename*=UTF-8''%C3%A9t%C3%A9.jsonl` (RFC 5987; urllib3
    before 1.25, so `requests`) had its file read as a plain field, its name dropped: past 64 KiB a 413 that said to
    send the file as 'file', which it was, and under it "no file in the upload"."""
    data = b'{"text": "the cow says moo"}\n' * 4000  # 120 KB
    for path, form in (("/datasets", b""), ("/v1/files", b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n'
                                                          b"\r\nfine-tune\r\n")):
        for size in (len(data), 100):
            body = (form + b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''%C3%A9t%C3%A9.jsonl"
                    b"\r\n\r\n" + data[:size] + b"\r\n--b--\r\n")
            made = client.post(path, content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
            assert made.status_code in (200, 201), (path, size, made.text)
            assert (made.json()["filename"], made.json()["bytes"]) == ("été.jsonl", size)


@pytest.mark.parametrize(("name", "stored"), [
    (b"filename*=idna''%C3%A9t%C3%A9.jsonl", "\u00e9t\u00e9.jsonl"),  # Python's decoders of these raise with "replace"
    (b"filename*=undefined''%C3%A9t%C3%A9.jsonl", "\u00e9t\u00e9.jsonl"),
    (b"filename*=punycode''%C3%A9t%C3%A9.jsonl", "\u00e9t\u00e9.jsonl"),
    (b"filename*=rot13''abc.jsonl", "abc.jsonl"),  # no text encoding: read as UTF-8
    (b"filename*=iso-8859-1''%E9t%E9.jsonl", "\u00e9t\u00e9.jsonl"),
    (b'filename="a;filename*=UTF-8\'\'evil.jsonl"', "a;filename*=UTF-8''evil.jsonl"),  # quoted: a name, not a parameter
    (b"filename*=utf-7''a%2B2AA-.jsonl", "a\ufffd.jsonl"),  # half a surrogate pair, which no database can store
    (b"filename*=unicode_escape''%5Cudc80.jsonl", "\ufffd.jsonl"),
    (b"filename*=unicode_escape''%5Cud83d%5Cude00%5Cud83d.jsonl", "\U0001f600\ufffd.jsonl"),  # a whole pair is one
    (b"filename*=utf-7''%2B2D3eAA-.jsonl", "\U0001f600.jsonl"),
])
def test_an_extended_file_name_in_any_charset_is_a_name_not_an_error(client, name, stored):
    """`filename*=idna''...` (undefined, punycode) was a 500: Python's decoders of those charsets raise where others
    replace what they cannot read; so was a utf-7 or unicode_escape name decoded to half a surrogate pair, which the
    database driver cannot encode (a whole pair, though, is the one character it spells, not two U+FFFD). And a
    plain name quoting `;filename*=` was taken for an extended one."""
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; ' + name + b'\r\n\r\n{"text": "moo"}\n\r\n--b--\r\n')
    made = client.post("/datasets", content=body, headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert made.status_code == 201, made.text
    assert made.json()["filename"] == stored


def test_a_body_sent_compressed_is_refused_naming_its_encoding_and_nothing_is_made(client):
    """A client set to compress its requests (Content-Encoding: gzip) was told "not valid JSON: expected value at
    line 1 column 1", or for an upload "not valid multipart/form-data: Expected boundary character 45, got 31":
    no route decodes a compressed body. It is a 415 naming the encoding (RFC 7694), before the body is read."""
    spec = gzip.compress(json.dumps({"base_model": "llama-3-8b", "training": {"max_steps": 10}}).encode())
    upload = client.build_request("POST", "/datasets", files={"file": ("t.jsonl", b'{"text": "moo"}\n')})
    for path, body, content_type in (("/jobs", spec, "application/json"), ("/jobs/preflight", spec, "application/json"),
                                     ("/datasets", gzip.compress(upload.read()), upload.headers["content-type"])):
        answer = client.post(path, content=body, headers={"Content-Type": content_type, "Content-Encoding": "gzip"})
        assert answer.status_code == 415, (path, answer.text)
        assert answer.json()["error"]["code"] == "unsupported_content_encoding"
        assert "Content-Encoding: 'gzip'" in answer.json()["error"]["message"]
        assert answer.headers["accept-encoding"] == "identity"
    assert client.get("/datasets").json()["data"] == [] and client.get("/jobs").json()["data"] == []
    # `identity` is no encoding at all
    made = client.post("/datasets", files={"file": ("t.jsonl", b'{"text": "moo"}\n')},
                       headers={"Content-Encoding": "identity"})
    assert made.status_code == 201, made.text


def test_a_request_without_a_body_is_not_refused_for_a_content_encoding(client):
    """A client set to send Content-Encoding: gzip on every request sends it on a cancel, a pause or a resume too,
    which carry no body: nothing was compressed, and the route answers (here: no such job), not a 415."""
    for action in ("cancel", "pause", "resume"):
        for declared in ({"Content-Length": "0"}, {}):
            answer = client.send(client.build_request("POST", f"/jobs/job-missing/{action}",
                                                      headers={"Content-Encoding": "gzip", **declared}))
            assert answer.status_code == 404, (action, declared, answer.text)
            assert answer.json()["error"]["code"] == "not_found"
    # a body that does come compressed is refused, on any route
    answer = client.post("/jobs/job-missing/cancel", content=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 415, answer.text


def test_a_request_refused_before_its_route_carries_the_headers_every_answer_does(client):
    """The 415 for a compressed body and the 400 for a NUL in the URL were answered before the headers every
    other answer carries were added: a browser was free to guess their type, and send a Referer onward."""
    refused = [client.post("/jobs", content=gzip.compress(b"{}"), headers={"Content-Encoding": "gzip",
                                                                             "Content-Type": "application/json"}),
               client.get("/jobs/job%00x"), client.get("/jobs", params={"name": "a\x00b"})]
    assert [answer.status_code for answer in refused] == [415, 400, 400], [answer.text for answer in refused]
    for answer in refused:
        assert answer.headers["x-content-type-options"] == "nosniff", answer.headers
        assert answer.headers["referrer-policy"] == "no-referrer", answer.headers
        assert answer.headers["cache-control"] == "no-store", answer.headers  # asked with a key, as any answer


def test_a_key_sent_without_its_scheme_is_told_to_say_bearer(client):
    """`Authorization: qlk_…` (the scheme forgotten) answered "missing API key", as if no key had been sent."""
    key = client.headers["Authorization"].removeprefix("Bearer ")
    for header in (key, f"Basic {key}"):
        response = client.get("/quota", headers={"Authorization": header})
        assert response.status_code == 401, response.text
        assert "the Authorization header is not 'Bearer <key>'" in response.json()["error"]["message"]
    del client.headers["Authorization"]
    assert "missing API key" in client.get("/quota").json()["error"]["message"]
    assert client.get("/quota", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_a_job_sent_without_its_json_content_type_is_told_to_send_it(client):
    """`curl -d '{...}'` without `-H 'content-type: application/json'` sends a form: the answer was "the body must be
    a JSON object", about a body that was one."""
    body = json.dumps({"dataset_id": "0" * 32, "base_model": "tiny-demo", "training": {"max_steps": 10}})
    for path in ("/jobs", "/jobs/preflight"):
        response = client.post(path, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert response.status_code == 422, response.text
        assert "'Content-Type: application/json'" in response.json()["error"]["message"], response.text


def test_a_missing_training_section_or_base_model_says_what_to_set():
    """Pydantic's own message was all the answer said: "training: Field required"."""
    for body, field, says in (({"base_model": "m"}, "training", "training.epochs or training.max_steps"),
                              ({"training": {"max_steps": 1}}, "base_model", "a registered model (GET /models")):
        with pytest.raises(SpecError) as refused:
            JobSpec.parse(body)
        assert says in dict(refused.value.errors)[field], refused.value.errors


@pytest.mark.parametrize("kind", [[], {}, ["dpo"]])
def test_a_method_type_that_is_no_string_is_refused_naming_it_on_the_native_routes(client, kind):
    """A list or an object as method.type was a 500 (unhashable, looked up in the learning rates before the field
    checks ran) on POST /jobs and /jobs/preflight; /v1 refused it itself."""
    body = {"dataset_id": "d" * 32, "base_model": "tiny", "training": {"max_steps": 10}, "method": {"type": kind}}
    for path in ("/jobs", "/jobs/preflight"):
        response = client.post(path, json=body)
        assert response.status_code == 422, response.text
        assert [d["field"] for d in response.json()["error"]["details"]] == ["method.type"], response.text


def test_a_tool_calling_dataset_is_taken_and_a_bad_call_is_named_by_its_line(client):
    """OpenAI's tool-calling rows upload as chat rows, natively and through /v1/files; a call of a tool the row
    does not define makes the upload invalid, naming its line and what to add."""
    tools = [{"type": "function", "function": {"name": "get_sound", "parameters": {"type": "object"}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_sound", "arguments": '{"animal": "cow"}'}}
    row = {"tools": tools, "messages": [{"role": "user", "content": "What does the cow say?"},
                                        {"role": "assistant", "content": None, "tool_calls": [call]},
                                        {"role": "tool", "tool_call_id": "call_1", "content": "moo"},
                                        {"role": "assistant", "content": "The cow says moo."}]}
    data = (json.dumps(row) + "\n").encode() * 3
    made = client.post("/datasets", files={"file": ("tools.jsonl", data)})
    assert made.status_code == 201, made.text
    assert (made.json()["status"], made.json()["format"], made.json()["rows"]) == ("ready", "chat", 3)
    made = client.post("/v1/files", files={"file": ("tools.jsonl", data)}, data={"purpose": "fine-tune"})
    assert made.status_code == 200 and made.json()["status"] == "processed", made.text

    wrong = {**row, "messages": [row["messages"][0], {**row["messages"][1], "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": "{}"}}]}]}
    invalid = client.post("/datasets", files={"file": ("tools.jsonl", data + (json.dumps(wrong) + "\n").encode())}).json()
    assert invalid["status"] == "invalid" and invalid["errors"] == [{"line": 4, "message": (
        "messages[1]: tool_calls[0]: calls 'get_weather', which the row's \"tools\" do not define: the model would "
        "learn to call a tool it was never shown; add its definition to the row's tools")}]


NUMBERS = [("training", name) for name in ("epochs", "max_steps", "learning_rate", "per_device_batch_size",
                                           "gradient_accumulation_steps", "max_seq_length", "warmup_ratio",
                                           "weight_decay", "max_grad_norm", "seed", "logging_steps", "eval_steps",
                                           "save_steps", "early_stopping")] + \
          [("lora", name) for name in ("r", "alpha", "dropout")] + \
          [("eval", name) for name in ("prompts", "max_new_tokens", "temperature")] + \
          [("method", name) for name in ("beta", "label_smoothing")]


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize(("section", "field"), NUMBERS)
def test_true_or_false_where_a_number_goes_is_refused_naming_the_field(section, field, value):
    """pydantic reads a JSON boolean as 1 or 0: `"learning_rate": true` was a job that trained at 1.0, and
    `"max_steps": true` one of a single step, with no word said."""
    spec = {"base_model": "tiny", "training": {"max_steps": 10}}
    if section == "method":
        spec["method"] = {"type": "dpo"}
    if field in ("epochs", "max_steps"):
        spec["training"] = {}
    spec.setdefault(section, {})[field] = value
    with pytest.raises(SpecError) as refused:
        JobSpec.parse(spec)
    assert (f"{section}.{field}", "a number, not true or false") in refused.value.errors
    # The switches stay true or false.
    spec = {"base_model": "tiny", "training": {"max_steps": 10, "gradient_checkpointing": value, "packing": value},
            "lora": {"use_rslora": value}, "quantization": {"double_quant": value}, "output": {"merge": value}}
    assert JobSpec.parse(spec).lora.use_rslora is value


@pytest.mark.parametrize(("training", "hyperparameters", "field", "says"), [
    ({"epochs": 1e-300}, {}, "training.epochs", "allowed: [0.01, 100], or set training.max_steps"),
    ({"epochs": 0.009}, {}, "training.epochs", "allowed: [0.01, 100], or set training.max_steps"),
    ({"max_steps": 10, "learning_rate": 1e-300}, {}, "training.learning_rate", "allowed: [1e-07, 1]"),
    ({}, {"n_epochs": 1, "learning_rate_multiplier": 1e-300}, "training.learning_rate", "allowed: [1e-07, 1]"),
])
def test_a_value_in_range_but_too_small_to_mean_anything_is_refused_on_both_routes(client, training, hyperparameters,
                                                                                      field, says):
    """epochs 1e-300 was inside (0, 100] and trained one step, whatever the data (the step count is rounded up); a
    learning rate of 1e-300 held a GPU to move the adapter by nothing. POST /jobs and the OpenAI route refuse them
    alike, through the one spec validation, naming the field and the range."""
    if not hyperparameters:
        native = client.post("/jobs", json={"dataset_id": "d" * 32, "base_model": "tiny", "training": training})
        assert native.status_code == 422, native.text
        (detail,) = native.json()["error"]["details"]
        assert detail["field"] == field and says in detail["message"], detail
    openai = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": "file-" + "d" * 32,
                                                        "hyperparameters": hyperparameters, "training": training})
    assert openai.status_code == 400, openai.text
    error = openai.json()["error"]
    assert says in error["message"], error
    assert error["param"] == {"training.epochs": "hyperparameters.n_epochs",
                              "training.learning_rate": "hyperparameters.learning_rate_multiplier"}[field]
    assert client.get("/jobs").json()["data"] == []


def test_a_stored_spec_from_before_the_minimums_still_runs():
    """A job queued across the upgrade with epochs 1e-300 resumes as it was accepted, not failed as invalid."""
    stored = {"base_model": "tiny", "training": {"epochs": 1e-300, "learning_rate": 1e-300}}
    assert JobSpec.parse(stored, stored=True).training.epochs == 1e-300
    with pytest.raises(SpecError):
        JobSpec.parse(stored)
    # A job continuing its adapter is checked against the adapter's shape as stored: read as a new request, the
    # check was skipped, and the job refused at setup after its wait in the queue.
    started = Job(id="a" * 32, spec={**stored, "lora": {"r": 8}})
    with pytest.raises(Invalid, match="lora.r: job a{32}'s adapter has 8, this job asks for 16"):
        check_lora_shape(started, JobSpec.parse({"base_model": "tiny", "training": {"max_steps": 1}}))


def test_eval_prompts_past_their_total_are_refused_naming_the_field_and_nothing_is_made(client):
    """256 prompts of 20,000 characters each were accepted: a 30 MB spec carried by every poll, list page and
    stream message of the job, and a create-and-cancel loop of them grew the database by megabytes a second,
    counted by no quota. Within the total they are accepted; past it, 422 names eval.prompts and the way out."""
    prompts = ["x" * 20_000] * (MAX_EVAL_PROMPT_CHARS // 20_000)
    body = {"base_model": "tiny", "training": {"max_steps": 1}}
    refused = client.post("/jobs", json={**body, "dataset_id": "d" * 32, "eval": {"prompts": [*prompts, "x" * 20_000]}})
    assert refused.status_code == 422, refused.text
    (detail,) = refused.json()["error"]["details"]
    assert detail["field"] == "eval.prompts" and "131,072" in detail["message"] and "validation dataset" in detail[
        "message"], detail
    assert client.get("/jobs").json()["data"] == []
    openai = client.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": "file-" + "d" * 32,
                                                        "eval": {"prompts": [*prompts, "x" * 20_000]}})
    assert openai.status_code == 400 and "131,072" in openai.json()["error"]["message"], openai.text
    within = client.post("/jobs", json={**body, "dataset_id": "d" * 32, "eval": {"prompts": prompts}})
    assert "prompts" not in within.text, within.text  # refused for its model (none is registered here), not them
    # The service's rule alone: the engine (qlora train, a job stored before it) reads any number of them.
    assert len(JobSpec.parse({**body, "eval": {"prompts": ["x" * 20_000] * 256}}).eval.prompts) == 256
