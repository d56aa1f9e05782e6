"""kafka-python's group membership as the `streamproc asr` worker uses it: a consumer
polling with a short timeout gets its partitions back after a rebalance that takes longer
than one poll."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import NewPartitions, NewTopic

from streamproc import kafka as clients  # noqa: F401  (the client fixes it applies)

pytestmark = pytest.mark.broker


def _member(bootstrap: str, group: str) -> KafkaConsumer:
    # metadata refreshed often: the leader sees the new partitions soon; a session that
    # outlasts the test: a member left behind is not rescued by its expiry
    return KafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                         enable_auto_commit=False, session_timeout_ms=45000,
                         heartbeat_interval_ms=1000, metadata_max_age_ms=500)


def test_the_leader_gets_partitions_after_a_rebalance_longer_than_its_poll(
        kafka_bootstrap: str) -> None:
    """The leader sees a topic grow and rejoins; the other member rejoins only at its next
    poll, seconds later, so the leader's JoinGroup outlasts many of its 100 ms polls and
    most likely completes between two of them (as under load). It must still take up
    its share of the new assignment."""
    topic, group = f"rejoin-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    members: list[KafkaConsumer] = []
    stop = threading.Event()
    poller: threading.Thread | None = None
    try:
        admin.create_topics([NewTopic(topic, 2, 1)])
        a, b = _member(kafka_bootstrap, group), _member(kafka_bootstrap, group)
        members = [a, b]
        for c in members:
            c.subscribe([topic])
        deadline = time.monotonic() + 30
        while not (a.assignment() and b.assignment()) and time.monotonic() < deadline:
            for c in members:
                c.poll(timeout_ms=100)
        assert a.assignment() and b.assignment(), "no stable two-member group"
        # only the group's leader watches the metadata; the other member polls slowly
        leader, follower = (a, b) if a._coordinator._is_leader else (b, a)
        assert leader._coordinator._is_leader

        def slow_polls() -> None:  # a member busy between polls: heartbeats go on
            assert follower is not None
            while not stop.is_set():
                stop.wait(3.0)
                follower.poll(timeout_ms=100)

        poller = threading.Thread(target=slow_polls, daemon=True)
        poller.start()
        admin.create_partitions({topic: NewPartitions(total_count=4)})
        deadline = time.monotonic() + 20  # the follower rejoins within 3 s
        held: set[int] = set()
        while time.monotonic() < deadline:
            leader.poll(timeout_ms=100)
            time.sleep(0.5)  # busy between polls, as a worker handing records on is
            held = {tp.partition for tp in leader.assignment() | follower.assignment()}
            if held == {0, 1, 2, 3} and leader.assignment():
                break
        assert leader.assignment(), \
            "after the rebalance the leader holds nothing and no longer rejoins"
        assert held == {0, 1, 2, 3}
    finally:
        stop.set()
        if poller is not None:
            poller.join(10)  # not polling any more when its consumer closes
        for c in members:
            c.close(autocommit=False)
        admin.delete_topics([topic])
        admin.close()
