"""The Earth Engine ``url`` option decides where the OAuth bearer token goes: Google or loopback only."""

from __future__ import annotations

import pytest

from gum_ray.cli import main
from gum_ray.errors import InputError
from gum_ray.sources import earthengine as E
from gum_ray.sources import get_source
from gum_ray.sources.options import check_earthengine_url
from tests.hostile import error_lines, gum_cli

ACCEPTED = [
    "https://earthengine-highvolume.googleapis.com",
    "https://earthengine.googleapis.com/",
    "http://127.0.0.1:8765",
    "http://127.5.6.7:9",
    "http://[::1]:8765",
    "http://localhost:8765",
    "https://localhost",
]
REFUSED = {
    "http://earthengine.googleapis.com": "plain http",
    "http://evil.example.com:8765": "plain http",
    "https://evil.example.com": "not a Google API host",
    "https://googleapis.com.evil.example": "not a Google API host",
    "https://earthengine.googleapis.com@evil.example": "user information",
    "http://127.0.0.1.nip.io:8765": "plain http",
    "ftp://127.0.0.1/": "the scheme is 'ftp'",
    "127.0.0.1:8765": "the scheme",
    "http://10.0.0.5:8765": "plain http",
    "https://": "no host",
}


@pytest.mark.parametrize("url", ACCEPTED)
def test_google_and_loopback_urls_are_accepted(url):
    assert check_earthengine_url(url) == url.rstrip("/")
    assert E.EarthEngineSource(project="p", url=url).url == url.rstrip("/")


@pytest.mark.parametrize("url", sorted(REFUSED))
def test_foreign_urls_are_refused_before_any_request(url):
    with pytest.raises(InputError, match=REFUSED[url]) as err:
        get_source("ee", project="p", url=url)
    assert "\n" not in str(err.value) and "sends your credentials there" in str(err.value)
    with pytest.raises(InputError):
        E.initialize_ee(url=url, project="p", credentials="anonymous")


def test_foreign_url_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    data = tmp_path / "data"
    code = main(["map", "--bbox", "8.55", "47.35", "8.6", "47.4", "--year", "2021", "--source", "ee",
                 "--source-option", "url=http://evil.example.com", "--source-option", "project=p",
                 "--checkpoint", str(tmp_path / "none.pth"), "--data-dir", str(data), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("gum: error: --source-option url=http://evil.example.com: refused because")
    assert not data.exists()


def test_foreign_url_from_the_console_script(tmp_path):
    r = gum_cli("map", "--bbox", "8.55", "47.35", "8.6", "47.4", "--year", "2021", "--source", "ee",
                "--source-option", "url=https://evil.example.com", "--source-option", "project=p",
                "--checkpoint", tmp_path / "none.pth", "--data-dir", tmp_path / "data", "--quiet")
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "not a Google API host" in lines[0], lines
    assert not (tmp_path / "data").exists()
