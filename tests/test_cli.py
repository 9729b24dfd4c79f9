"""The `idguard` console script dispatches to every command's main."""
import importlib

import pytest

from experiments import cli


def test_every_command_is_importable_and_has_main():
    for name, (module, _) in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_dispatch_and_usage(capsys):
    assert cli.main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0 and "protect" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["protect", "--help"])
    assert e.value.code == 0 and "--generator" in capsys.readouterr().out
