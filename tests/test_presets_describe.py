"""presets.describe (reflexflow/presets.py) returns its text; joins tests/test_presets.py
once that file is free to edit."""

from reflexflow import presets


def test_describe_returns_its_text_and_prints_nothing(capsys):
    text = presets.describe("defar")
    assert text == presets.SOURCES["defar"]
    assert capsys.readouterr().out == ""
    assert "Returns the text" in presets.describe.__doc__
