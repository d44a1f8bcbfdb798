"""The credentials file `qlora serve` writes for the CLI (app/bootstrap.py): its key from the first start, and the
address of the start that runs now."""

from __future__ import annotations

import json
import shutil

from app.bootstrap import bootstrap_embedded
from app.config import Settings


def test_a_later_start_on_another_port_saves_its_address_beside_the_first_key(tmp_path, tiny_model_dir):
    """The file kept the first start's URL: after `qlora serve --port 8438` (8437 taken, as serve's own error
    advises), every CLI command went to 8437, "cannot reach the API". Found by a new user's second start."""
    home = tmp_path / "home"
    build = lambda path: shutil.copytree(tiny_model_dir, path)  # noqa: E731
    said: list[str] = []
    bootstrap_embedded(Settings(home=home, port=8437), announce=said.append, build_demo_model=build)
    first = json.loads((home / "credentials.json").read_text())
    assert first["url"] == "http://127.0.0.1:8437"

    said.clear()
    bootstrap_embedded(Settings(home=home, port=8438), announce=said.append, build_demo_model=build)
    assert json.loads((home / "credentials.json").read_text()) == {"url": "http://127.0.0.1:8438", "api_key": first["api_key"]}
    assert said == [f"the API's address is now http://127.0.0.1:8438 (it was http://127.0.0.1:8437): saved to "
                    f"{home / 'credentials.json'} for the CLI"]

    said.clear()
    bootstrap_embedded(Settings(home=home, port=8438), announce=said.append, build_demo_model=build)
    assert said == []  # the same address: nothing written, nothing said


def test_a_credentials_file_of_another_shape_is_left_as_it_is(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    build = lambda path: shutil.copytree(tiny_model_dir, path)  # noqa: E731
    bootstrap_embedded(Settings(home=home, port=8437), announce=lambda _: None, build_demo_model=build)
    (home / "credentials.json").write_text('{"url": "http://127.0.0.1:8437"}')  # its key removed by hand
    bootstrap_embedded(Settings(home=home, port=8438), announce=lambda _: None, build_demo_model=build)
    assert (home / "credentials.json").read_text() == '{"url": "http://127.0.0.1:8437"}'


def test_serve_says_where_the_dashboard_and_its_key_are(tmp_path, tiny_model_dir):
    """A start after the first printed "API on http://...:8437 (docs at /docs)": nothing said the dashboard is
    there too, nor where the key its sign-in page asks for is, which the first start had shown once."""
    from app.cli.processes import listening_line

    settings = Settings(home=tmp_path / "home", port=8437)
    assert listening_line(settings) == "API and dashboard on http://127.0.0.1:8437 (docs at /docs)"  # no key yet
    bootstrap_embedded(settings, announce=lambda _: None, build_demo_model=lambda path: shutil.copytree(tiny_model_dir, path))
    assert listening_line(settings) == (f"API and dashboard on http://127.0.0.1:8437 (docs at /docs; sign in with the "
                                        f"key in {settings.credentials_path})")
    # A deployment's serve (a broker server) makes no credentials file: its keys come from `qlora admin create-key`.
    served = Settings(home=tmp_path / "home", port=8437, broker_url="redis://127.0.0.1:6379/0", api_workers=4)
    assert listening_line(served) == "API and dashboard on http://127.0.0.1:8437 in 4 processes (docs at /docs)"
