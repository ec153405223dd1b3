import pytest
from click.testing import CliRunner

from engine.cli import main
from engine.weights import find_package_weights


@pytest.mark.skipif(find_package_weights("tf_efficientnet_lite0") is None, reason="offline weights absent")
def test_demo_runs_offline_and_finds_same_class_photos(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_OFFLINE", "1")
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "--device", "cpu", "demo", "-k", "5"])
    assert result.exit_code == 0, result.output
    assert "indexed 80 sample photos" in result.output
    same, total = result.output.split("same-class hits in the top 5: ")[1].split()[0].split("/")
    assert total == "15" and int(same) >= 13
    assert (tmp_path / "home" / "demo-contact-sheet.png").stat().st_size > 10_000
