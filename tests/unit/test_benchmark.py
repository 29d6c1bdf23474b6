"""tools/benchmark.py's pure parts: the docs marker replacement and the
scaling series' per-node costs."""

import pytest

from tools import benchmark


def test_replace_marked_replaces_only_between_the_markers():
  text = f"# Title\n\nintro\n{benchmark.BEGIN}\nold table\n| a |\n{benchmark.END}\n\nafter\n"
  new = benchmark.replace_marked(text, "| new |")
  assert new == f"# Title\n\nintro\n{benchmark.BEGIN}\n| new |\n{benchmark.END}\n\nafter\n"
  assert benchmark.replace_marked(new, "| new |") == new  # Rerunning changes nothing.


@pytest.mark.parametrize("text, found", [
    ("no markers", "found 0 and 0"),
    (f"{benchmark.END}\n{benchmark.BEGIN}", "in the wrong order"),
    (f"{benchmark.BEGIN}\n{benchmark.BEGIN}\n{benchmark.END}", "found 2 and 1"),
    (f"{benchmark.BEGIN}\ntable", "found 1 and 0$"),
])
def test_replace_marked_refuses_missing_or_misplaced_markers(text, found):
  with pytest.raises(ValueError, match=found):
    benchmark.replace_marked(text, "| new |")


def _size(nodes, seconds):
  return {"module": f"n{nodes}", "nodes": nodes,
          "cold": {"naive": {"seconds": seconds, "peak_tree_rss_mb": 700 + nodes / 100}}}


def test_per_node_costs_sorted_with_marginal_cost_between_sizes():
  series = benchmark.add_per_node_costs([_size(30000, 9.0), _size(10000, 5.0)])
  assert [r["nodes"] for r in series] == [10000, 30000]
  first, second = (r["per_1k_nodes"]["naive"] for r in series)
  assert first["seconds"] == [0.5, None]
  assert second["seconds"] == [0.3, pytest.approx(0.2)]  # (9 - 5) s / 20k nodes.
  assert second["peak_tree_rss_mb"][1] == pytest.approx(10.0)  # 1 MB per 100 nodes.


def test_throughputs_interleave_single_calls_rotating_the_first(monkeypatch):
  monkeypatch.setattr(benchmark, "MIN_SECONDS", 0.0)
  order = []
  sides = {name: (lambda name=name: order.append(name)) for name in "abc"}
  figures = benchmark._throughputs(sides, batch=4, rounds=1)
  assert order[:6] == list("aabbcc")  # The warm-up: two calls each.
  assert order[6:] == list("abcbcacab")  # Three passes, one call each at a time.
  assert set(figures) == set("abc") and all(v > 0 for v in figures.values())
