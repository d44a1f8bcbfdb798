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
