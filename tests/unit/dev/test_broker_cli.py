"""`streamproc broker`'s flags: each action takes only the flags that act for it."""

from __future__ import annotations

import pytest

from streamproc.cli import build_parser


def test_fetch_refuses_dir_which_would_do_nothing(capsys) -> None:
    # the jars go to one cache whatever the broker's directory
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["broker", "fetch", "--dir", "X"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --dir X" in capsys.readouterr().err
    assert build_parser().parse_args(["broker", "fetch"]).action == "fetch"


@pytest.mark.parametrize("action", ["start", "stop", "status"])
def test_the_broker_directory_actions_take_dir(action: str) -> None:
    assert build_parser().parse_args(["broker", action, "--dir", "X"]).dir == "X"
