"""The running broker loads the generated contract, never the client package's runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

from harness.brokerproc import broker_config, render_toml
from harness.process import short_tmpdir

# Serves for real (cli.main, the same path as `mongo-broker serve`), answers
# one call of each RPC that needs no collection, then records sys.modules and
# stops itself with SIGTERM, as an orchestrator would.
_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, threading, time

    import grpc

    from broker import cli

    config, ready, report = sys.argv[1:4]

    def probe():
        while not os.path.exists(ready):
            time.sleep(0.02)
        target = "unix:" + json.loads(open(ready).read())["unix"]
        with grpc.insecure_channel(target) as channel:
            for method in ("Ping", "Stats"):
                channel.unary_unary(f"/broker.v1.Broker/{method}")(b"", timeout=10)
        with open(report, "w") as out:
            json.dump(sorted(sys.modules), out)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=probe, daemon=True).start()
    sys.exit(cli.main(["serve", "--config", config, "--ready-file", ready]))
    """
)

# What importing the generated stubs may load of the client distribution.
_CONTRACT = ("broker_client", "broker_client._version")


def test_a_serving_broker_loads_no_client_runtime(db_server) -> None:
    work = short_tmpdir()
    try:
        config = work / "broker.toml"
        config.write_text(
            render_toml(broker_config(db_uri=db_server.uri, socket_path=work / "b.sock", tcp=None))
        )
        report = work / "modules.json"
        done = subprocess.run(
            [sys.executable, "-c", _SCRIPT, str(config), str(work / "ready.json"), str(report)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        modules = json.loads(report.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert "broker.service" in modules  # it really served
    loaded = [
        m
        for m in modules
        if m.startswith("broker_client") and m not in _CONTRACT and not m.startswith("broker_client.proto")
    ]
    assert not loaded, f"the broker loaded client modules: {loaded}"
