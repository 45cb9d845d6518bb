"""The dashboard's page: one server-rendered HTML document, complete without JavaScript.

Pure: state, refresh status, history and ``now`` in, HTML out. Everything the page needs is inline
(styles, SVG charts, one small script); nothing is fetched from elsewhere. The script only refreshes
the page's ``<main>`` in place every few seconds; without it a ``<noscript>`` meta refresh reloads the
page. Every value from the swarm (names, versions, errors) is escaped: records come from anyone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape

from homeswarm.dashboard.charts import Point, line_chart
from homeswarm.dashboard.history import DAY, Sample
from homeswarm.dashboard.state import ModelView, RefreshStatus, ServerView, SwarmState
from homeswarm.protocol.block_range import block_range

_STYLE = """
:root{--bg:#fff;--fg:#1d232b;--muted:#687483;--line:#dfe3e8;--card:#f6f8fa;--ok:#1a8f4b;--bad:#c93a3a;
--warn:#c98a14;--c0:#e15b5b;--c1:#e8b23c;--c2:#5ab46b;--c3:#2e8b57}
@media (prefers-color-scheme:dark){:root{--bg:#14181d;--fg:#e3e7ec;--muted:#8d98a5;--line:#2b323a;
--card:#1b2128}}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;background:var(--bg);color:var(--fg)}
header,main,footer{max-width:1200px;margin:0 auto;padding:12px 16px}
header{display:flex;flex-wrap:wrap;gap:4px 16px;align-items:baseline;border-bottom:1px solid var(--line)}
h1{font-size:20px;margin:0}h2{font-size:18px;margin:0 0 4px;display:flex;gap:10px;align-items:center;flex-wrap:wrap}
.muted,.chart text{color:var(--muted);fill:var(--muted)}
.chart text{font-size:10px}.chart .axis{stroke:var(--line)}.chart .grid{stroke:var(--line);stroke-dasharray:3 3}
.banner{border:1px solid var(--warn);border-left-width:6px;padding:8px 12px;margin:12px 0;border-radius:6px}
.model{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px;margin:16px 0}
.badge{font-size:13px;font-weight:600;padding:2px 10px;border-radius:999px;color:#fff}
.badge.ok{background:var(--ok)}.badge.bad{background:var(--bad)}
.bar{display:flex;height:22px;border-radius:5px;overflow:hidden;border:1px solid var(--line);margin:8px 0 2px}
.bar span{flex:1 1 0;min-width:1px}
.c0{background:var(--c0)}.c1{background:var(--c1)}.c2{background:var(--c2)}.c3{background:var(--c3)}
.ends{display:flex;justify-content:space-between;font-size:12px}
.legend{font-size:12px;display:flex;gap:12px;flex-wrap:wrap;margin:2px 0 8px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:-1px}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:8px 16px;margin:10px 0}
figure{margin:0}figcaption{font-size:12px;color:var(--muted)}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;font-size:13px;white-space:nowrap}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line)}
th{font-weight:600;color:var(--muted)}td.num{text-align:right;font-variant-numeric:tabular-nums}
.span{display:inline-block;position:relative;width:70px;height:8px;background:var(--line);border-radius:4px;
margin-left:6px;vertical-align:middle}.span b{position:absolute;top:0;bottom:0;background:var(--c2);border-radius:4px}
.yes{color:var(--ok)}.no{color:var(--bad)}.state-offline,.state-joining,.state-busy{color:var(--warn)}
.state-unreachable{color:var(--bad);font-weight:600}
a{color:inherit}
@media (max-width:600px){body{font-size:14px}header,main,footer{padding:10px}.model{padding:10px}}
"""

# refreshes <main> in place; failures are ignored (the next tick tries again)
_SCRIPT = """
setInterval(function(){fetch(location.href,{cache:"no-store"}).then(function(r){return r.ok?r.text():null})
.then(function(t){if(!t)return;var m=new DOMParser().parseFromString(t,"text/html").querySelector("main");
if(m)document.querySelector("main").replaceWith(m)}).catch(function(){})},REFRESH_MS);
"""


def duration(seconds: float) -> str:
    """A short human duration: 42 s, 5 min, 3 h 10 min, 2 d 4 h."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if hours < 1:
        return f"{minutes} min"
    if days < 1:
        return f"{hours} h {minutes % 60} min"
    return f"{days} d {hours % 24} h"


def _num(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def coverage_bar(model: ModelView) -> str:
    cells = []
    for block, (n, tput) in enumerate(zip(model.coverage, model.block_throughput, strict=True)):
        tip = f"block {block}: {_plural(n, 'server')}, {_num(tput)} steps/s"
        cells.append(f'<span class="c{min(n, 3)}" title="{tip}"></span>')
    last = model.num_blocks - 1
    return (f'<div class="bar" role="img" aria-label="servers per block">{"".join(cells)}</div>'
            f'<div class="ends muted"><span>block 0</span><span>block {last}</span></div>'
            '<div class="legend muted"><span><i class="c0"></i>no server</span><span><i class="c1"></i>1</span>'
            '<span><i class="c2"></i>2</span><span><i class="c3"></i>3 or more</span></div>')


def _server_row(server: ServerView, num_blocks: int) -> str:
    probe = server.probe
    name = escape(server.public_name) if server.public_name else f"<code>{escape(server.peer_id[-10:])}</code>"
    left = server.start / num_blocks * 100
    width = (min(server.end, num_blocks) - server.start) / num_blocks * 100
    span = f'<span class="span"><b style="left:{left:.1f}%;width:{width:.1f}%"></b></span>'
    # an unreachable server's record still says online: say so, since it is what the node announced
    state_tip = (f' title="announced {server.state.value}; its probe failed"' if server.status != server.state.value
                 else "")
    # unquantized weights are their dtype; a quantized format with the dtype its other tensors keep
    weights = (escape(server.dtype) if server.quant == "none"
               else f"{escape(server.quant)} · {escape(server.dtype)}")
    reachable = ('<span class="yes">yes</span>' if probe.reachable else
                 f'<span class="no" title="{escape(probe.error or "")}">no</span>')
    cells = [
        f'<td title="{escape(server.peer_id)} at {escape(server.address)}">{name}</td>',
        f"<td>{block_range(server.start, server.end)}{span}</td>",
        f'<td class="state-{server.status}"{state_tip}>{server.status}</td>',
        f'<td class="num">{_num(server.throughput)}</td>',
        f'<td class="num">{server.cache_tokens_left:,}</td>',
        f"<td>{weights}</td>",
        f"<td>{escape(probe.version) or '—'}</td>",
        f"<td>{reachable}</td>",
        f"<td>{server.connection or '—'}</td>",
        f'<td class="num">{f"{probe.rtt_ms:.1f} ms" if probe.rtt_ms is not None else "—"}</td>',
        f'<td class="num">{duration(probe.uptime_seconds) if probe.uptime_seconds is not None else "—"}</td>',
        f'<td class="num">{probe.active_sessions if probe.active_sessions is not None else "—"}</td>',
    ]
    return f"<tr>{''.join(cells)}</tr>"


_HEADER_TIPS = {"Blocks": "A:B: blocks A to B-1, as join-swarm --blocks A:B takes them",
                "State": "as announced, except unreachable: announced online but not answering"}
_HEADERS = ("Name", "Blocks", "State", "Steps/s", "Free cache (tokens)", "Weights", "Version", "Reachable",
            "Connection", "Round trip", "Uptime", "Sessions")


def _charts(model: ModelView, samples: Sequence[Sample], now: float) -> str:
    figures = []
    for label, value, color in (("Servers online", lambda s: (s.online, s.online_low, s.online_high), "#2f7de1"),
                                ("Weakest block, steps/s",
                                 lambda s: (s.weakest_throughput, s.weakest_low, s.weakest_high), "#8a4fd6")):
        # a merged row's mean is no moment's value: the line follows its highest, the whisker its range
        points = [Point(s.time, s.span, v if high is None else high, low, high)
                  for s in samples for v, low, high in [value(s)]]
        for period, seconds in (("last day", DAY), ("last week", 7 * DAY)):
            title = f"{label}, {period}"
            svg = line_chart(points, start=now - seconds, end=now, label=f"{model.name}: {title}", color=color)
            figures.append(f"<figure>{svg}<figcaption>{escape(title)}</figcaption></figure>")
    return f'<div class="charts">{"".join(figures)}</div>'


def model_section(model: ModelView, samples: Sequence[Sample], now: float) -> str:
    badge = '<span class="badge ok">healthy</span>' if model.healthy else '<span class="badge bad">broken</span>'
    missing = model.num_blocks - model.covered_blocks
    summary = (f"{_plural(model.online_servers, 'server')} online · {model.covered_blocks} of "
               f"{_plural(model.num_blocks, 'block')} covered"
               + (f" ({missing} without a server)" if missing else "")
               + f" · weakest block {_num(model.weakest_throughput)} steps/s")
    rows = "".join(_server_row(s, model.num_blocks) for s in model.servers)
    heads = "".join(f'<th title="{_HEADER_TIPS[h]}">{h}</th>' if h in _HEADER_TIPS else f"<th>{h}</th>"
                    for h in _HEADERS)
    table = (f'<div class="scroll"><table><thead><tr>{heads}</tr></thead>'
             f"<tbody>{rows}</tbody></table></div>" if model.servers else '<p class="muted">No server announced.</p>')
    name = escape(model.name)
    return (f'<section class="model" id="model-{name}"><h2>{name} {badge}</h2><div>{summary}</div>'
            f"{coverage_bar(model)}{_charts(model, samples, now)}{table}</section>")


def _banner(state: SwarmState, status: RefreshStatus, now: float) -> str:
    if status.ok or status.last_attempt == 0.0:
        return ""
    shown = (f"Showing the state of {duration(now - state.updated)} ago." if state.updated
             else "No state to show yet.")
    return (f'<div class="banner" role="alert"><strong>The swarm cannot be read right now</strong> '
            f"({escape(status.error or 'unknown error')}). {shown}</div>")


def render_page(state: SwarmState, status: RefreshStatus, history: Mapping[str, Sequence[Sample]], now: float,
                *, refresh_seconds: float) -> str:
    """``history``: per model, its samples of the last week (older ones are not drawn)."""
    if state.updated:
        age = f"updated {duration(now - state.updated)} ago"
    else:
        age = "waiting for the first look at the swarm" if status.last_attempt == 0.0 else "no state yet"
    peers = f" · {_plural(status.dht_peers, 'DHT peer')}" if status.ok else ""
    if state.models:
        body = "".join(model_section(m, history.get(m.name, ()), now) for m in state.models)
    elif state.updated:
        body = '<p class="muted">No model is announced in this swarm yet.</p>'
    else:
        body = ""
    refresh_ms = int(max(2.0, refresh_seconds) * 1000)
    healthy = sum(1 for m in state.models if m.healthy)
    overview = (f"<p>{_plural(len(state.models), 'model')}, {healthy} healthy</p>" if state.models else "")
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<noscript><meta http-equiv="refresh" content="{max(10, refresh_ms // 1000)}"></noscript>'
        f"<title>homeswarm · swarm health</title><style>{_STYLE}</style></head><body>"
        "<header><h1>homeswarm swarm health</h1></header>"
        f'<main><p class="muted" id="age">{age}{peers}</p>{_banner(state, status, now)}{overview}{body}</main>'
        '<footer class="muted">JSON: <a href="/api/v1/state">/api/v1/state</a> · '
        "<code>/api/v1/history?model=NAME&amp;since=UNIX</code> · metrics: <a href=\"/metrics\">/metrics</a></footer>"
        f"<script>{_SCRIPT.replace('REFRESH_MS', str(refresh_ms))}</script></body></html>"
    )
