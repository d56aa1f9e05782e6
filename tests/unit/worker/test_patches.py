"""The worker refuses faust-streaming and aiokafka versions its patches were not tested
against, with one clear line; the ack handle of a batched record."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from streamproc.errors import UserError
from streamproc.worker.patches import TESTED_VERSIONS, RecordAck, check_versions


def test_the_installed_versions_are_the_tested_ones() -> None:
    check_versions()


@pytest.mark.parametrize("name", sorted(TESTED_VERSIONS))
def test_another_version_is_refused_with_one_line(name: str) -> None:
    installed = dict(TESTED_VERSIONS, **{name: "99.0.0"})
    with pytest.raises(UserError) as err:
        check_versions(installed)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"{name} 99.0.0 is installed" in msg and f"{name}=={TESTED_VERSIONS[name]}" in msg


def test_the_pins_in_pyproject_are_the_tested_versions() -> None:
    pyproject = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    for name, version in TESTED_VERSIONS.items():
        assert f'"{name}=={version}"' in pyproject



def test_a_batched_record_acks_through_the_consumers_ack_once_released() -> None:
    acked: list[tuple[tuple[str, int], int]] = []
    consumer = SimpleNamespace(ack=lambda m: acked.append((m.tp, m.offset)))
    handle = RecordAck(consumer, ("t.video", 2), 17)
    assert (handle.topic, handle.partition, handle.offset, handle.acked) == ("t.video", 2, 17,
                                                                             False)
    handle.ack()
    assert acked == [(("t.video", 2), 17)]
