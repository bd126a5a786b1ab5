"""``python -m rm_lightning.prepare``: bad input is one ``error:`` line and exit status 2."""

from rm_lightning.experiments.prepare import main


def test_a_cache_root_that_is_a_file_is_one_line_naming_the_variable(tmp_path, monkeypatch, capsys):
    (tmp_path / "cache").write_text("not a folder\n")
    monkeypatch.setenv("RM_LIGHTNING_CACHE", str(tmp_path / "cache"))
    assert main(["smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot convert 'smollm2-135m-instruct'")
    assert "RM_LIGHTNING_CACHE" in err[0]


def test_help_prints_the_usage_instead_of_taking_it_for_a_backbone_name(capsys):
    import pytest

    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0 and "usage: python -m rm_lightning.prepare" in capsys.readouterr().out


def test_a_converted_folder_that_no_longer_loads_says_to_delete_it(tmp_path, monkeypatch, capsys):
    """prepare keeps a folder holding config.json, so "use 'smollm2-135m-instruct'" would send the user in a circle."""
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}\n')
    monkeypatch.setenv("RM_LIGHTNING_CACHE", str(tmp_path))
    assert main(["smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: the converted 'smollm2-135m-instruct' in {folder} cannot be loaded")
    assert err[-1].endswith("delete that folder and run python -m rm_lightning.prepare smollm2-135m-instruct")
