"""The docs stay true: every hook is in the README's plugin guide with its signature."""

import inspect
import re

from conftest import ROOT

from relay import hookspecs

README = (ROOT / "README.md").read_text(encoding="utf-8")


def hook_names():
    return [name for name, value in vars(hookspecs).items() if name.startswith("relay_") and callable(value)]


def test_every_hook_is_documented_with_its_parameters():
    names = hook_names()
    assert len(names) == 9
    guide = README.split("## Writing a handler plugin", 1)[1].split("\n## ", 1)[0]
    for name in names:
        row = re.search(rf"^\| `{name}` \| `\(([^)]*)\)", guide, re.M)
        assert row, f"{name} is missing from the hook reference table"
        documented = [p.split(":")[0].strip() for p in row.group(1).split(",") if p.strip()]
        assert documented == list(inspect.signature(getattr(hookspecs, name)).parameters), name
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"


def test_readme_opens_with_the_two_commands():
    blocks = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    assert "relay demo" in blocks[0] and "pip install" in blocks[0]
    assert "pytest" in blocks[1]
    assert "<!-- test-command -->\n```sh\n" + blocks[1] in README
