"""`longva download` in this process (test_cli.py runs the real executable): short names, bad
names, no network, and the completeness check of a downloaded model folder."""

from __future__ import annotations

import shutil

from longva_cli import hub


def assert_one_sentence(result, fragment: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and fragment in line, line


def test_list_shows_the_short_names_and_the_hubs_spelling(longva_main):
    result = longva_main("download", "--list")
    assert result.returncode == 0
    for name in ("LongVA-7B", "LongVA-7B-DPO", "Qwen2-7B-Instruct-224K", "clip-vit-large-patch14-336", "v_niah_needles"):
        assert name in result.stdout
    assert "lmms-lab/Qwen2-7B-Instrcuct-224K" in result.stdout


def test_bad_names_and_no_network_are_one_sentence(longva_main, tmp_path):
    assert_one_sentence(longva_main("download", "not a repo"), "unknown model")
    assert_one_sentence(longva_main("download"), "say what to download")
    assert_one_sentence(longva_main("download", "LongVA-7B", "--local-dir", str(tmp_path / "w")), "hub")  # the tests run offline


def test_a_downloaded_model_lacking_a_shard_is_named(longva_main, tiny_checkpoint, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "LongVA-7B")
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    monkeypatch.setattr(hub, "download", lambda name, local_dir=None, revision=None: folder)
    assert_one_sentence(longva_main("download", "LongVA-7B"), shard.name)
    shutil.copy(tiny_checkpoint / shard.name, shard)
    done = longva_main("download", "LongVA-7B")
    assert done.returncode == 0 and done.stdout.strip() == str(folder)
