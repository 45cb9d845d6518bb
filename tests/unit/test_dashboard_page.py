"""The server-rendered page and its SVG charts (pure): content, escaping, no external assets, staleness."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from homeswarm.dashboard.charts import Point, line_chart, segments, thin
from homeswarm.dashboard.history import DAY, Sample
from homeswarm.dashboard.page import duration, render_page
from homeswarm.dashboard.state import Probe, RefreshStatus, SwarmState, build_state
from homeswarm.routing.records import PeerId, ServerRecord, ServerState

NOW = 1_800_000_000.0


def record(peer: str, start: int, end: int, name: str = "", state: ServerState = ServerState.ONLINE) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address="127.0.0.1:1", model="llama", start=start, end=end, state=state,
                        protocol_version=1, dtype="bfloat16", throughput=12.5, cache_tokens_left=4096,
                        public_name=name, quant="int4")


def swarm_state(*, evil: bool = False) -> SwarmState:
    records = [record("p1", 0, 2, "alice"), record("p2", 2, 4, "<script>alert(1)</script>" if evil else "bob"),
               record("p3", 0, 4)]
    probes = {PeerId("p1"): Probe(reachable=True, rtt_ms=3.25, version="0.1.0", uptime_seconds=7300),
              PeerId("p2"): Probe(reachable=True, rtt_ms=1.0, version="0.1.0"),
              PeerId("p3"): Probe(reachable=False, error="UNAVAILABLE: <refused>")}
    return build_state({"llama": 4, "broken-model": 2}, {"llama": records}, probes, now=NOW - 3)


def text_of(html: str) -> str:
    """The visible text, roughly: tags, the style and the script removed."""
    html = re.sub(r"<(style|script)>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_page_shows_models_health_and_servers():
    html = render_page(swarm_state(), RefreshStatus(ok=True, last_attempt=NOW, dht_peers=4), {}, NOW,
                       refresh_seconds=5)
    text = text_of(html)
    assert "llama" in text and "healthy" in text and "broken-model" in text and "broken" in text
    assert "2 servers online" in text and "4 of 4 blocks covered" in text
    assert "0 of 2 blocks covered (2 without a server)" in text
    assert "updated 3 s ago · 4 DHT peers" in text
    for cell in ("alice", "bob", "0:2", "2:4", "int4 · bfloat16", "3.2 ms", "2 h 1 min", "4,096", "direct"):
        assert cell in text, cell
    # p3's record says online but it does not answer: unreachable, not online
    assert html.count('<td class="state-online">online</td>') == 2
    assert html.count('<td class="state-unreachable" title="announced online; its probe failed">unreachable</td>') == 1
    assert html.count("<tr>") == 4  # a header and three servers
    assert 'title="UNAVAILABLE: &lt;refused&gt;"' in html
    assert "The swarm cannot be read" not in text


def test_page_needs_nothing_from_elsewhere_and_refreshes_with_or_without_script():
    html = render_page(swarm_state(), RefreshStatus(ok=True, last_attempt=NOW), {}, NOW, refresh_seconds=5)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert '<meta name="viewport"' in html
    assert '<noscript><meta http-equiv="refresh"' in html
    assert "setInterval(" in html and "5000" in html


def test_names_from_the_swarm_are_escaped():
    html = render_page(swarm_state(evil=True), RefreshStatus(ok=True, last_attempt=NOW), {}, NOW, refresh_seconds=5)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_a_failed_refresh_shows_the_age_of_the_last_good_state():
    status = RefreshStatus(ok=False, last_attempt=NOW, error="no DHT peer of the swarm answers")
    text = text_of(render_page(swarm_state(), status, {}, NOW + 120, refresh_seconds=5))
    assert "The swarm cannot be read right now (no DHT peer of the swarm answers)" in text
    assert "Showing the state of 2 min ago." in text and "llama" in text
    never = text_of(render_page(SwarmState(updated=0.0), status, {}, NOW, refresh_seconds=5))
    assert "No state to show yet." in never


def test_before_the_first_refresh_and_an_empty_swarm():
    assert "waiting for the first look at the swarm" in text_of(
        render_page(SwarmState(updated=0.0), RefreshStatus(), {}, NOW, refresh_seconds=5))
    empty = render_page(SwarmState(updated=NOW), RefreshStatus(ok=True, last_attempt=NOW), {}, NOW, refresh_seconds=5)
    assert "No model is announced in this swarm yet." in text_of(empty)


def test_charts_per_model_over_a_day_and_a_week():
    samples = [Sample(time=NOW - 3 * DAY + 60 * i, span=60, servers=3, online=3, covered_blocks=4, num_blocks=4,
                      healthy=1, weakest_throughput=12.5) for i in range(10)]
    html = render_page(swarm_state(), RefreshStatus(ok=True, last_attempt=NOW), {"llama": samples}, NOW,
                       refresh_seconds=5)
    section = html.split('id="model-llama"')[1].split("</section>")[0]
    assert section.count("<svg") == 4
    for caption in ("Servers online, last day", "Servers online, last week", "Weakest block, steps/s, last week"):
        assert caption in section
    # three days ago: drawn on the week's charts, not on the day's
    day_online, week_online = section.split("<svg")[1:3]
    assert "no data yet" in day_online and "<path" in week_online


def test_line_chart_is_well_formed_svg():
    points = [Point(NOW - 600 + 60 * i, 60, float(i)) for i in range(10)]
    svg = line_chart(points, start=NOW - 3600, end=NOW, label="a <label>")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg") and root.find("{http://www.w3.org/2000/svg}title").text == "a <label>"
    assert "no data yet" in line_chart([], start=NOW - 3600, end=NOW, label="x")


def test_thin_keeps_each_columns_last_value_and_its_range():
    points = [Point(float(t), 1.0, float(t % 2)) for t in range(100)]
    thinned = thin(points, 0.0, 100.0, columns=10)
    assert len(thinned) == 10
    assert all((p.value, p.low, p.high, p.span) == (1.0, 0.0, 1.0, 10.0) for p in thinned)
    # thinning thinned points keeps the range they carry
    again = thin(thinned, 0.0, 100.0, columns=2)
    assert [(p.value, p.low, p.high) for p in again] == [(1.0, 0.0, 1.0)] * 2


def test_a_drop_from_3_to_2_servers_reads_as_3_then_2_not_2_5():
    # a day's chart: 432 s per column, a minute's samples, the drop in the middle of a column
    end = NOW
    points = [Point(end - 3600 + 60 * i, 60, 3.0 if i < 33 else 2.0) for i in range(60)]
    thinned = thin(points, end - DAY, end, columns=200)
    assert {p.value for p in thinned} == {3.0, 2.0}
    assert all(p.low in (2.0, 3.0) and p.high in (2.0, 3.0) for p in thinned)
    svg = line_chart(points, start=end - DAY, end=end, label="servers")
    line = re.search(r'<path d="([^"]+)" fill="none"', svg).group(1)
    heights = {float(xy.split(",")[1]) for xy in re.findall(r"[\d.]+,[\d.]+", line)}
    assert len(heights) == 2  # the line is at 3 or at 2, never between
    whisker = re.search(r'<path class="range" d="([^"]+)"', svg).group(1)  # the column of the drop
    assert {float(xy.split(",")[1]) for xy in re.findall(r"[\d.]+,[\d.]+", whisker)} == heights
    assert ">3</text>" in svg  # the top of the scale: the most servers seen


def test_one_sample_is_drawn():
    svg = line_chart([Point(NOW - 60, 60, 3.0)], start=NOW - DAY, end=NOW, label="servers")
    assert "no data yet" not in svg and "<path" in svg and "<circle" in svg


def test_unquantized_weights_show_their_dtype():
    records = [ServerRecord(peer_id=PeerId("f"), address="127.0.0.1:1", model="m", start=0, end=2,
                            state=ServerState.ONLINE, protocol_version=1, dtype="float32", throughput=1.0,
                            cache_tokens_left=1, quant="none")]
    state = build_state({"m": 2}, {"m": records}, {PeerId("f"): Probe(reachable=True)}, now=NOW)
    html = render_page(state, RefreshStatus(ok=True, last_attempt=NOW), {}, NOW, refresh_seconds=5)
    assert "<td>float32</td>" in html and "none" not in text_of(html)


def test_segments_break_at_gaps():
    points = [Point(0, 60, 1), Point(60, 60, 1), Point(500, 60, 1), Point(560, 60, 1)]
    assert [len(run) for run in segments(points)] == [2, 2]


def test_duration():
    assert [duration(s) for s in (0, 59, 60, 3599, 3660, 86400 + 7200)] == [
        "0 s", "59 s", "1 min", "59 min", "1 h 1 min", "1 d 2 h"]


def test_a_merged_row_draws_its_range_not_its_mean():
    merged = Sample(time=NOW - 2 * DAY, span=600, servers=2.5, online=2.5, covered_blocks=4, num_blocks=4,
                    healthy=1, weakest_throughput=12.5, online_low=2, online_high=3, weakest_low=10,
                    weakest_high=15)
    html = render_page(swarm_state(), RefreshStatus(ok=True, last_attempt=NOW), {"llama": [merged]}, NOW,
                       refresh_seconds=5)
    week_online = html.split('id="model-llama"')[1].split("<svg")[2].split("</svg>")[0]
    assert ">3</text>" in week_online and 'class="range"' in week_online  # the top: the most servers seen
    assert ">2.50</text>" not in week_online
