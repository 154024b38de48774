"""InterruptionWatcher and IMDSClient against a fake IMDS on loopback."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from spotrun_trainer.imds import IMDSClient, IMDSError
from spotrun_trainer.watcher import InterruptionWatcher


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_watcher_without_notice_keeps_training(fake_imds):
    watcher = InterruptionWatcher(IMDSClient(fake_imds.url), poll_seconds=0.01).start(
        handle_sigterm=False
    )
    try:
        assert _wait_for(lambda: watcher.polls >= 5)
        assert not watcher.stop_requested.is_set()
        assert watcher.notice is None and watcher.rebalance is None
        assert fake_imds.token_puts == 1  # one token serves every poll
    finally:
        watcher.close()


def test_watcher_instance_action_requests_stop(fake_imds, capsys):
    # GIVEN a watcher polling a quiet IMDS
    watcher = InterruptionWatcher(IMDSClient(fake_imds.url), poll_seconds=0.01).start(
        handle_sigterm=False
    )
    try:
        assert _wait_for(lambda: watcher.polls >= 2)
        # WHEN the spot warning appears
        before = time.time()
        fake_imds.notify_interruption()
        # THEN the watcher asks the trainer to stop and says when it saw the notice
        assert watcher.stop_requested.wait(10)
        assert watcher.notice.kind == "instance-action"
        assert watcher.notice.detail["action"] == "terminate"
        assert watcher.notice.t >= before
    finally:
        watcher.close()
    assert '{"event":"notice","kind":"instance-action","t":' in capsys.readouterr().out


def test_watcher_rebalance_is_an_early_warning_only(fake_imds):
    watcher = InterruptionWatcher(IMDSClient(fake_imds.url), poll_seconds=0.01).start(
        handle_sigterm=False
    )
    try:
        fake_imds.recommend_rebalance()
        assert _wait_for(lambda: watcher.rebalance is not None)
        polls = watcher.polls
        assert _wait_for(lambda: watcher.polls > polls + 2)  # still polling
        # THEN no stop, and the session is told exactly once
        assert not watcher.stop_requested.is_set()
        assert watcher.take_rebalance() is True
        assert watcher.take_rebalance() is False
    finally:
        watcher.close()


def test_imds_client_renews_an_expired_token(fake_imds):
    # GIVEN a client holding a token
    client = IMDSClient(fake_imds.url)
    assert client.get("meta-data/instance-id") == fake_imds.instance_id
    # WHEN IMDS forgets every token (expiry, restart) and answers 401
    fake_imds.expire_tokens()
    # THEN the client takes a new token and the read succeeds
    assert client.get("meta-data/instance-id") == fake_imds.instance_id
    assert fake_imds.unauthorized == 1
    assert fake_imds.token_puts == 2


def test_imds_client_refreshes_before_the_ttl_ends(fake_imds):
    # A one-second TTL: with the 20 % margin the client renews after about 0.8 s,
    # before IMDS would refuse the token.
    client = IMDSClient(fake_imds.url, token_ttl_seconds=1)
    client.get("meta-data/instance-id")
    time.sleep(0.9)
    client.get("meta-data/instance-id")
    assert fake_imds.token_puts == 2
    assert fake_imds.unauthorized == 0


def test_imds_client_404_is_none(fake_imds):
    assert IMDSClient(fake_imds.url).get("meta-data/spot/instance-action") is None


def test_watcher_survives_imds_down_and_sees_it_come_back(fake_imds, caplog):
    # GIVEN an IMDS endpoint where nothing listens (connection refused)
    client = IMDSClient(f"http://127.0.0.1:{_dead_port()}", timeout_seconds=0.5)
    with pytest.raises(IMDSError):
        client.get("meta-data/instance-id")
    watcher = InterruptionWatcher(client, poll_seconds=0.01).start(handle_sigterm=False)
    try:
        # WHEN it keeps failing
        assert _wait_for(lambda: watcher.polls >= 5)
        # THEN the thread is alive, logged the error once, and has no notice
        assert watcher._thread is not None and watcher._thread.is_alive()
        assert sum("IMDS poll failed" in r.getMessage() for r in caplog.records) == 1
        assert not watcher.stop_requested.is_set()
        # AND when IMDS comes back, a notice still gets through
        client.endpoint = fake_imds.url
        fake_imds.notify_interruption()
        assert watcher.stop_requested.wait(10)
    finally:
        watcher.close()


def test_watcher_sigterm_requests_stop_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGTERM)
    watcher = InterruptionWatcher(None).start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.stop_requested.wait(5)
        assert watcher.notice.kind == "sigterm"
    finally:
        watcher.close()
    assert signal.getsignal(signal.SIGTERM) is previous
