"""adapterctl against a server that sends terminal escapes (issue 18, item 2): whatever it
prints from the server (names, descriptions, job messages and errors, tables and JSON)
holds no raw control character, so a tenant's adapter cannot retitle or clear the
terminal of whoever lists it. The server is a stand-in on loopback, over a real channel,
so that the test does not depend on what adapterd itself lets in."""

from __future__ import annotations

import json
from concurrent import futures

import grpc
import pytest
from adapterctl.cli import main as adapterctl
from adapterctl.terminal import json_line, safe
from adapterd_api.v1 import adapters_pb2 as apb
from adapterd_api.v1 import adapters_pb2_grpc as apb_grpc
from adapterd_api.v1 import training_pb2 as tpb
from adapterd_api.v1 import training_pb2_grpc as tpb_grpc

EVIL = "evil\x1b]0;pwned\x07\x1b[2J\r\x00\x9b31m\u202e\u2028"
RAW = ("\x1b", "\x07", "\r", "\x00", "\x9b", "\u202e", "\u2028")


def evil_adapter() -> apb.Adapter:
    return apb.Adapter(name=EVIL, tenant=EVIL, version=1, ref=f"{EVIL}/x@1", description=EVIL, sha256=EVIL,
                       target_modules=[EVIL], metrics={EVIL: 1.0}, job_id=EVIL, residence=99, source=99)


def evil_job() -> tpb.Job:
    return tpb.Job(id=EVIL, name=EVIL, state=tpb.FAILED, error=EVIL, description=EVIL, adapter=EVIL,
                   hyperparameters=tpb.Hyperparameters(target_modules=[EVIL]))


class Adapters(apb_grpc.AdaptersServicer):
    def ListAdapters(self, request, context):
        return apb.ListAdaptersResponse(adapters=[evil_adapter()])

    def GetAdapter(self, request, context):
        return evil_adapter()

    def DeleteAdapter(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, f"adapter {EVIL} not found")


class Training(tpb_grpc.TrainingServicer):
    def GetJob(self, request, context):
        return evil_job()

    def ListJobs(self, request, context):
        return tpb.ListJobsResponse(jobs=[evil_job()])

    def CancelJob(self, request, context):
        return evil_job()

    def WatchJob(self, request, context):
        yield tpb.JobEvent(type=tpb.MESSAGE, message=EVIL)
        yield tpb.JobEvent(type=tpb.STATE, state=tpb.FAILED, message=EVIL)


@pytest.fixture(scope="module")
def addr():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    apb_grpc.add_AdaptersServicer_to_server(Adapters(), server)
    tpb_grpc.add_TrainingServicer_to_server(Training(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("argv", [
    ["list"], ["list", "--json"], ["show", "x"], ["show", "x", "--json"], ["delete", "x"],
    ["jobs", "list"], ["jobs", "list", "--json"], ["jobs", "show", "j"], ["jobs", "show", "j", "--json"],
    ["jobs", "cancel", "j"], ["jobs", "watch", "j"],
])
def test_nothing_the_server_sends_reaches_the_terminal_raw(addr, argv, capsys):
    adapterctl(["--addr", addr, *argv])
    out, err = capsys.readouterr()
    printed = out + err
    assert "evil" in printed  # it was printed...
    assert not [c for c in RAW if c in printed], repr(printed)  # ...escaped
    if "--json" in argv:
        for line in out.splitlines():
            assert EVIL in json.loads(line).values()  # still the server's value, as JSON


def test_escaping_keeps_printable_text():
    assert safe("Résumés → SQL, « précis »") == "Résumés → SQL, « précis »"
    assert safe("a\x1b[2Jb\tc\nd") == "a\\x1b[2Jb\\tc\\nd"
    assert safe("\u202eabc\x9b") == "\\u202eabc\\x9b"
    assert json.loads(json_line({"d": "x\x9by\u2028"})) == {"d": "x\x9by\u2028"}
    assert "\x9b" not in json_line({"d": "x\x9b"})
