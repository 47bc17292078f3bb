"""schemathesis against both services' own /openapi.json: requests generated from the document,
valid ones (positive) and ones that break it (negative), each sent to a running server. Every
answer is a 2xx, or a 4xx whose JSON names the problem, never a 5xx; schemathesis checks status
codes, content types, bodies and the bearer token against the document; the server answers its
liveness probe after every request; and the learn journal holds exactly the samples that were
acknowledged, as they were sent.

EDGECL_FUZZ_EXAMPLES sets the examples per operation and mode (CI: 15, about 380 requests in
all; 300 gives about 7,000, the figure in docs/reliability.md); run with -s to see the counts.
"""

import os
import sys
from collections import Counter

import numpy as np
import pytest
import requests
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from learn_helpers import running, stream_config
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance
from test_serve import exported  # noqa: F401 (a fixture)
from test_serve import running as serving

from edgecl.daemon.daemon import Daemon
from edgecl.daemon.journal import SAMPLE, Journal
from edgecl.daemon.schema import parse_body

EXAMPLES = int(os.environ.get("EDGECL_FUZZ_EXAMPLES", "15"))
TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
LEARN = stream_config(checkpoint_every=10**9, checkpoint_seconds=10**9, keep_checkpoints=100,
                      end_wait_s=0.2)  # an end waiting for samples that never come: brief
# a request valid under serve's document may still not fit the model's input shape (the
# document cannot know it): serve is held to every check but that one
SERVE_EXCLUDED = [positive_data_acceptance]
# schema-breaking data must get a 4xx: any 4xx (413 for too many samples, 408...), not only
# schemathesis's default list; every 4xx must also name the problem (checked below)
CONFIG = SchemathesisConfig.from_dict(
    {"checks": {"negative_data_rejection": {"expected-statuses": ["4XX"]}}})


@pytest.fixture
def subnormals():
    """schemathesis draws subnormal floats, which torch's learners turn off process-wide (on
    the thread that builds them): back on for the test, as it was after."""
    flushing = sys.float_info.min / 2 == 0
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(flushing)


def fuzz(url: str, live: str, known_task: str | None = None,
         after=lambda case, response: None, excluded=()) -> Counter:
    """Send EXAMPLES requests per operation and mode, generated from the /openapi.json of the
    server at `url`, to it (half of those naming a task name `known_task` instead); after each,
    GET `live` must answer 200. Returns the answers' status counts."""
    statuses: Counter = Counter()
    session = requests.Session()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=CONFIG, headers=AUTH)
    for operation in (op.ok() for op in schema.get_all_operations()):
        negatable = len(operation.body) or len(operation.path_parameters)
        for mode in MODES if negatable else MODES[:1]:
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode), known=st.booleans())
            def one(case, known):
                if known and known_task and "task" in (case.path_parameters or {}):
                    case.path_parameters["task"] = known_task
                response = case.call(base_url=url, session=session, headers=AUTH)
                statuses[response.status_code] += 1
                case.validate_response(response, excluded_checks=list(excluded), headers=AUTH)
                assert response.status_code < 500, response.text
                if response.status_code >= 400:
                    assert response.json()["error"].strip(), response.text
                after(case, response)
                assert session.get(url + live, timeout=10).status_code == 200

            one()
    return statuses


def test_learn_answers_generated_requests_and_journals_only_what_it_acknowledged(
        tmp_path, subnormals):
    daemon = Daemon(LEARN, tmp_path / "state")
    torch.set_flush_denormal(False)  # the learner just turned it on again
    acked: dict[int, np.ndarray] = {}  # first seq -> the inputs of an acknowledged request

    def after(case, response):
        if case.path == "/v1/samples" and response.status_code == 202:
            sent = parse_body(daemon.schema, response.request.body,
                              response.request.headers["Content-Type"], 10_000)
            ack = response.json()
            assert ack["count"] == len(sent)
            acked[ack["first_seq"]] = sent.x.reshape(len(sent), -1)
        assert daemon.alive

    with running(daemon, token=TOKEN) as server:
        statuses = fuzz(server.url, "/healthz", after=after)
        rejected = daemon.status()["rejected"]
    print(f"learn: {sum(statuses.values())} requests, statuses {dict(statuses)}")
    assert rejected > 0 and acked  # both kinds were generated

    journal = Journal(tmp_path / "state" / "journal.sqlite3", max_tasks=3)
    chunks = [c for c in journal.read(0, 10**6) if c.kind == SAMPLE]
    journal.close()
    journaled = {}
    for c in chunks:
        journaled.setdefault(max(s for s in acked if s <= c.seq), []).append(c.x)
    assert journaled.keys() == acked.keys()
    for first, x in acked.items():
        np.testing.assert_array_equal(np.concatenate(journaled[first]), x)


def test_serve_answers_generated_requests(exported, subnormals):  # noqa: F811
    with serving(exported[1], token=TOKEN) as server:
        statuses = fuzz(server.url, "/v2/health/live", "t0",
                        excluded=SERVE_EXCLUDED)
    print(f"serve: {sum(statuses.values())} requests, statuses {dict(statuses)}")
    assert statuses[200] and statuses[400] and statuses[404]
