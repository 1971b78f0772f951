"""The Prometheus collector reads EngineMetrics at scrape time: every exported engine counter equals the
engine's own number (no server needed)."""

from __future__ import annotations

import re

from idlm.metrics import EngineMetrics, VerifyStep
from idlm.server.metrics import ServerMetrics


def _value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} missing"
    return float(m.group(1))


def test_engine_counters_including_draft_trees_are_exported():
    m = EngineMetrics(steps=7, generation_tokens=20, prompt_tokens=11)
    m.record(VerifyStep(3, 2, tree_branches=2, tree_hit=True))
    m.record(VerifyStep(3, 0, tree_branches=1, tree_hit=False))
    text = ServerMetrics("tiny", lambda: m).render().decode()
    assert _value(text, "idlm:num_forwards_total") == 7
    assert _value(text, "idlm:generation_tokens_total") == 20
    assert _value(text, "idlm:spec_decode_num_drafts_total") == 2
    assert _value(text, "idlm:spec_decode_num_draft_tokens_total") == 6
    assert _value(text, "idlm:spec_decode_num_accepted_tokens_total") == 2
    assert _value(text, "idlm:spec_decode_num_tree_branches_total") == 3
    assert _value(text, "idlm:spec_decode_num_tree_hits_total") == 1
    loading = ServerMetrics("tiny", lambda: None).render().decode()
    assert _value(loading, "idlm:num_requests_running") == 0
