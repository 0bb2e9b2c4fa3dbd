"""docs/knobs.md is generated from ReflexFlowConfig's field declarations (tools/knobs.py)
and kept fresh; every knob carries its doc."""

import dataclasses

from reflexflow.config import ReflexFlowConfig, knob
from tools import knobs


def test_docs_knobs_md_is_what_the_generator_writes():
    assert knobs.OUT.is_file(), "run python -m tools.knobs"
    assert knobs.OUT.read_text() == knobs.render(), "docs/knobs.md is stale: python -m tools.knobs"
    assert knobs.main(["--check"]) == 0


def test_every_knob_is_declared_with_a_doc_and_has_a_row():
    text = knobs.render()
    for f in knobs.knob_fields():
        assert f.metadata.get("doc"), f"{f.name}: declare it with knob(default, doc, source)"
        assert f"| `{f.name}` |" in text


def test_a_new_knob_needs_one_declaration_line_to_get_its_row(monkeypatch):
    extended = dataclasses.make_dataclass(
        "Extended",
        [("rollout_backend", str, knob("auto", "which engine rolls out", "ours"))],
        bases=(ReflexFlowConfig,),
        frozen=True,
    )
    monkeypatch.setattr(knobs, "ReflexFlowConfig", extended)
    row = '| `rollout_backend` | `"auto"` | which engine rolls out | ours |'
    assert row in knobs.render().splitlines()
    assert extended().rollout_backend == "auto"


def test_knob_is_a_plain_dataclass_default_with_its_doc():
    f = knob(0.25, "a doc", "a source")
    assert f.default == 0.25 and dict(f.metadata) == {"doc": "a doc", "source": "a source"}


def test_the_check_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "knobs.md"
    stale.write_text("# old table\n")
    monkeypatch.setattr(knobs, "OUT", stale)
    assert knobs.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert knobs.main([]) == 0 and stale.read_text() == knobs.render()
