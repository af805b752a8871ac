"""Filter cost benchmark: MeshInsight's Table 3 on pyproxy.

One pyproxy per configuration, all in HTTP mode in front of the same upstream
(a separate nginx answering `return 200` with a 100-byte body), all running
in the same bench run:

Every configuration runs with the default express lane, so a filter's added
cost is what adding it to a listener costs: the filter's own work and, while
the native lane carries filterless routes only, the general path it moves the
request to (filtered_path.py sets this beside nginx).

* baseline: no filters; plus a second, identical instance (`baseline_b`) as
  an A/A control: its "added cost" is the measurement's noise floor;
* each filter alone, configured so it runs on every request but never acts:
  fault (delay and abort, percentage 0: the decision runs, never fires),
  ratelimit (one bucket of 10^9 tokens), tap (every request to a file in a
  temp dir, max_body_bytes 1024), no-op Lua (`envoy_on_request` doing
  nothing), no-op WASM (`filters/wasm_examples/noop.wat`, hand-written), and
  `wasm_sdk`: the AssemblyScript SDK's headers example built from source by
  the SDK (`filters/wasm_examples/assemblyscript/assembly/headers.ts`: adds a
  request and a response header), Envoy's 26.3 µs its target too;
* combinations: the three native filters (fault+ratelimit+tap), lua+wasm,
  lua+native, wasm+native, all five.

Three measures of each configuration's added cost per request:

(1) stage clock: the proxy's own `filter:<name>` stages summed, divided by
    its requests (deltas of /stats?format=json over each phase). The tap
    filter encodes and writes its records outside its stage (counter
    `drain_ns`); that is reported beside it and counted when tap is judged
    against Envoy's "tap to file".
(2) end-to-end latency: p50 of 100-byte GETs at one outstanding request on one
    kept-alive connection minus the baseline's p50; client, upstream and every
    proxy pinned to CPU 0; rounds interleave the configurations in shuffled
    order so machine noise hits all alike.
(3) CPU per request under `wrk -t1 -c8`, the proxy under test alone on CPU 1
    (wrk and the upstream on CPU 0): utime+stime of the proxy's processes at
    ns resolution (/proc/<pid>/task/*/schedstat) over the wrk runs divided by
    the requests wrk completed, minus the baseline's.

For each combination: predicted = sum of its parts' added costs (from the
single-filter runs) vs measured, and the error %. Targets: each filter
cheaper than the paper's Envoy figure; additivity within 20 %.

With --baseline-tree PATH (another checkout, built), that checkout's pyproxy runs every
configuration too, as before_<name>, in the same rounds: each configuration's added p50 and
CPU against its own tree's no-filter proxy, side by side with this tree's, and their ratio.

Bounded: < 5 minutes with the defaults; progress on stderr; JSON in
bench/results/filter_bench/; the markdown report on stdout. Every process
started here is stopped at the end, whatever happens. Loopback only.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pyproxy.bench.filter_configs import filter_entry
from pyproxy.bench.http_bench import (
    Processes,
    begin_run,
    finish_run,
    round_parser,
    snap_delta,
    start_pyproxy,
    start_upstream,
)
from pyproxy.bench.http_load import Path_, log
from pyproxy.bench.procs import add_baseline_tree, baseline_tree_python, noise_note, tree_pids
from pyproxy.bench.results_folder import default_out
from pyproxy.bench.rounds import paired_median, run_phases

# MeshInsight (SoCC'23) Table 3: Envoy's added cost per request, µs.
ENVOY_US = {
    "fault": 5.7,
    "ratelimit": 8.2,
    "tap": 156.0,
    "lua": 80.6,
    "wasm": 26.3,
    "wasm_sdk": 26.3,
}
SINGLES = ("fault", "ratelimit", "tap", "lua", "wasm", "wasm_sdk")
NATIVE = ("fault", "ratelimit", "tap")
COMBOS = {
    "native3": NATIVE,
    "lua+wasm": ("lua", "wasm"),
    "lua+native3": ("lua", *NATIVE),
    "wasm+native3": ("wasm", *NATIVE),
    "all5": ("lua", "wasm", *NATIVE),
}
CHAIN_ORDER = ("fault", "ratelimit", "tap", "lua", "wasm", "wasm_sdk")  # native, then scripted
ADDITIVITY_TOLERANCE = 0.20


def configurations(only: str = "") -> dict[str, tuple[str, ...]]:
    """Every configuration, or (``only``: comma-separated names) those and the two baselines."""
    out: dict[str, tuple[str, ...]] = {"baseline": (), "baseline_b": ()}
    out.update({kind: (kind,) for kind in SINGLES})
    out.update(COMBOS)
    if only:
        wanted = {"baseline", "baseline_b", *only.split(",")}
        unknown = wanted - out.keys()
        if unknown:
            raise SystemExit(f"--only: unknown configuration(s) {', '.join(sorted(unknown))}")
        out = {name: filters for name, filters in out.items() if name in wanted}
    return out


def start_proxy(
    procs: Processes, workdir: Path, name: str, filters: tuple[str, ...], upstream: int,
    python: Path | None = None,
) -> Path_:  # fmt: skip
    chain = [filter_entry(k, workdir, name) for k in CHAIN_ORDER if k in filters]
    note = "+".join(filters) or "no filters"
    if python is None:
        return start_pyproxy(procs, workdir, name, upstream, http={"codec": "fast"},
                             filters=chain, note=note)  # fmt: skip
    return start_pyproxy(procs, workdir, f"before_{name}", upstream, http={"codec": "fast"},
                         filters=chain, python=str(python), note=f"{note}, baseline tree")  # fmt: skip


def before_after(result: dict) -> dict:
    """Per configuration: added p50 and CPU (paired medians against each tree's own no-filter
    proxy) for this tree and the --baseline-tree's, and this tree's over the other's."""
    lat, load = result["latency"], result["load"]
    out = {}
    for name in result["configurations"]:
        if name.startswith("baseline"):
            continue
        row = {}
        for measure, phase, key in (
            ("p50", lat, "p50_us_rounds"),
            ("cpu", load, "cpu_us_per_req_rounds"),
        ):
            now = paired_median(phase[name][key], phase["baseline"][key])
            before = paired_median(phase[f"before_{name}"][key], phase["before_baseline"][key])
            row[measure] = {
                "this_tree_us": now,
                "baseline_tree_us": before,
                "ratio": now / before if before > 0 else None,
            }
        out[name] = row
    return out


# ---- measurements ------------------------------------------------------------------------


def stage_costs(delta: dict) -> dict:
    """Per request, from a /stats delta: each filter stage, their sum, tap's drain, checks."""
    listener = delta["listeners"]["main"]
    requests = listener["requests"]
    filters = {
        stage.split(":", 1)[1]: v["ns"] / requests / 1e3
        for stage, v in listener["stages"].items()
        if stage.startswith("filter:") and requests
    }
    events = {
        stage.split(":", 1)[1]: v["events"]
        for stage, v in listener["stages"].items()
        if stage.startswith("filter:")
    }
    counters = listener.get("filters", {})
    tap = counters.get("tap", {})
    return {
        "requests": requests,
        "filters_us": filters,
        "stage_us": sum(filters.values()),
        "events": events,
        "tap_drain_us": tap.get("drain_ns", 0) / requests / 1e3 if requests else 0.0,
        "counters": counters,
        "all_stages_us": {
            stage: v["ns"] / requests / 1e3 for stage, v in listener["stages"].items() if requests
        },
    }


def sanity(name: str, filters: tuple[str, ...], costs: dict) -> list[str]:
    """Every filter ran on every request and none acted."""
    problems = []
    counters = costs["counters"]
    for kind in filters:
        if costs["events"].get(kind, 0) < costs["requests"]:
            problems.append(f"{name}: filter {kind} ran {costs['events'].get(kind, 0)} times")
    if "fault" in filters:
        c = counters["fault"]
        if c["delays_injected"] or c["aborts_injected"]:
            problems.append(f"{name}: fault injected {c}")
    if "ratelimit" in filters and counters["ratelimit"]["limited"]:
        problems.append(f"{name}: ratelimit limited {counters['ratelimit']['limited']}")
    if "tap" in filters:
        c = counters["tap"]
        if c["dropped"] or c["tapped"] < costs["requests"] - 8:
            problems.append(f"{name}: tap tapped {c['tapped']} dropped {c['dropped']}")
    for kind in ("lua", "wasm", "wasm_sdk"):
        if kind in filters and any(counters[kind].values()):
            problems.append(f"{name}: {kind} {counters[kind]}")
    return problems


# ---- analysis ----------------------------------------------------------------------------


def measures(result: dict) -> dict[str, dict[str, float]]:
    """Added µs per request for each configuration, by measure."""
    out = {}
    base_stage = result["stages"]["baseline"]["load"]["stage_us"]
    for name in result["configurations"]:
        stages = result["stages"][name]
        out[name] = {
            "stage": stages["load"]["stage_us"] - base_stage,
            "stage_serial": stages["latency"]["stage_us"],
            "tap_drain": stages["load"]["tap_drain_us"],
            "p50": result["latency"][name]["added_p50_us"],
            "p50_pooled": result["latency"][name]["added_p50_us_pooled"],
            "cpu": result["load"][name]["added_cpu_us_per_req"],
            "cpu_pooled": result["load"][name]["added_cpu_us_per_req_pooled"],
        }
    return out


def targets(m: dict) -> dict:
    out = {}
    for kind in SINGLES:
        if kind not in m:
            continue  # not run (--only)
        envoy = ENVOY_US[kind]
        stage = m[kind]["stage"] + (m[kind]["tap_drain"] if kind == "tap" else 0.0)
        out[kind] = {
            "envoy_us": envoy,
            "stage_us": stage,
            "p50_us": m[kind]["p50"],
            "cpu_us": m[kind]["cpu"],
            "met_stage": stage < envoy,
            "met_p50": m[kind]["p50"] < envoy,
            "met_cpu": m[kind]["cpu"] < envoy,
        }
    return out


def chain_fixed_cost(m: dict) -> dict[str, float]:
    """The per-request cost of having a chain at all, outside every filter:* stage.

    Estimated, per end-to-end measure, from the cheapest native filters alone:
    min over fault and ratelimit of (added end-to-end − its own stage). A
    combination pays it once, its parts each paid it, so the plain sum of
    parts counts it k times for k filters.
    """
    natives = [k for k in ("fault", "ratelimit") if k in m]
    if not natives:
        return {}  # neither was run (--only)
    return {
        measure: max(0.0, min(m[k][measure] - m[k]["stage"] for k in natives))
        for measure in ("p50", "cpu")
    }


def additivity(m: dict) -> dict:
    out = {}
    fixed = chain_fixed_cost(m)
    for combo, parts in COMBOS.items():
        if combo not in m or any(p not in m for p in parts):
            continue  # not run (--only)
        row = {}
        for measure in ("stage", "p50", "cpu"):
            predicted = sum(m[p][measure] for p in parts)
            measured = m[combo][measure]
            error = (measured - predicted) / predicted if predicted > 0 else None
            row[measure] = {
                "predicted_us": predicted,
                "measured_us": measured,
                "error": error,
                "met": error is not None and abs(error) <= ADDITIVITY_TOLERANCE,
            }
            if measure in fixed:
                # The same with the chain's fixed cost counted once instead of once per part.
                one_chain = predicted - (len(parts) - 1) * fixed[measure]
                err = (measured - one_chain) / one_chain if one_chain > 0 else None
                row[measure]["predicted_one_chain_us"] = one_chain
                row[measure]["error_one_chain"] = err
                row[measure]["met_one_chain"] = err is not None and abs(err) <= ADDITIVITY_TOLERANCE
        # Including the tap's drain (its file write), where tap is a part.
        if "tap" in parts:
            predicted = row["stage"]["predicted_us"] + m["tap"]["tap_drain"]
            measured = m[combo]["stage"] + m[combo]["tap_drain"]
            row["stage_with_drain"] = {
                "predicted_us": predicted,
                "measured_us": measured,
                "error": (measured - predicted) / predicted,
                "met": abs(measured - predicted) / predicted <= ADDITIVITY_TOLERANCE,
            }
        out[combo] = row
    return out


# ---- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = round_parser(
        __doc__,
        rounds=15,
        requests=600,
        round_seconds=0.5,
        load_rounds=6,
        seconds=2,
        out=str(default_out("filter_bench")),
    )
    parser.add_argument(
        "--only", default="", help="comma-separated configurations to run besides the baselines"
    )
    add_baseline_tree(parser)
    args = parser.parse_args(argv)
    base_python = baseline_tree_python(parser, args)
    result = begin_run(parser, args, ("nginx", "wrk", "taskset", "npm"))

    started = time.monotonic()
    configs = configurations(args.only)
    result["configurations"] = {name: list(f) for name, f in configs.items()}
    result["envoy_us"] = ENVOY_US
    with tempfile.TemporaryDirectory(prefix="pyproxy-filter-bench-") as tmp:
        workdir = Path(tmp)
        procs = Processes(workdir)
        try:
            log(f"starting the upstream and {len(configs)} proxies (all on CPU 0)")
            upstream = start_upstream(procs, workdir)
            paths = [start_proxy(procs, workdir, n, f, upstream) for n, f in configs.items()]
            if base_python is not None:
                paths += [
                    start_proxy(procs, workdir, n, f, upstream, base_python)
                    for n, f in configs.items()
                ]
            snaps: dict[str, dict] = {p.name: {"start": p.stats()} for p in paths}

            def snapshot(phase: str) -> None:
                for p in paths:
                    snaps[p.name][phase] = p.stats()

            run_phases(result, args, workdir, paths, latency_base="baseline", load_paths=paths,
                       connections=8, load_base="baseline", snapshot=snapshot)  # fmt: skip
            for p in paths:
                snaps[p.name]["pids"] = len(tree_pids(p.pid))
        finally:
            procs.stop_all()

    result["stages"] = {}
    problems = []
    for name, filters in configs.items():
        s = snaps[name]
        lat = stage_costs(snap_delta(s["latency"], s["start"]))
        load = stage_costs(snap_delta(s["load"], s["latency"]))
        result["stages"][name] = {"latency": lat, "load": load, "processes": s["pids"]}
        problems += sanity(name, filters, lat) + sanity(name, filters, load)
        if result["load"][name]["errors"]:
            problems.append(f"{name}: {result['load'][name]['errors']} wrk errors / non-2xx")
    result["problems"] = problems
    m = measures(result)
    result["added_us"] = m
    result["targets"] = targets(m)
    result["chain_fixed_cost_us"] = chain_fixed_cost(m)
    result["additivity"] = additivity(m)
    if base_python is not None:
        result["baseline_tree"] = {"path": args.baseline_tree, "added_us": before_after(result)}
    finish_run(result, args.out, started, report)
    return 1 if problems else 0


def _yes(met: bool) -> str:
    return "yes" if met else "**no**"


def _pct(error: float | None) -> str:
    return "—" if error is None else f"{error * 100:+.0f} %"


def report(result: dict) -> str:
    m, lat, load = result["added_us"], result["latency"], result["load"]
    lines = [
        "| configuration | filter stages µs/req, serial | filter stages µs/req, c8 "
        "| tap drain µs/req, c8 | p50 µs | added p50 µs (paired / pooled) | CPU µs/req, c8 "
        "| added CPU µs/req (paired / pooled) | Envoy µs (paper) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in result["configurations"]:
        drain = m[name]["tap_drain"]
        lines.append(
            f"| {name} | {m[name]['stage_serial']:.2f} | {m[name]['stage']:.2f} | "
            f"{f'{drain:.2f}' if drain else '—'} | {lat[name]['p50_us']:.1f} | "
            + (
                "—"
                if name == "baseline"
                else f"{m[name]['p50']:+.1f} / {m[name]['p50_pooled']:+.1f}"
            )
            + f" | {load[name]['cpu_us_per_req']:.1f} | "
            + (
                "—"
                if name == "baseline"
                else f"{m[name]['cpu']:+.1f} / {m[name]['cpu_pooled']:+.1f}"
            )
            + f" | {ENVOY_US.get(name, '—')} |"
        )
    lines += [
        "",
        "| filter | Envoy µs | stage µs (+ drain for tap) | met | added p50 µs | met | added CPU µs | met |",
        "| --- | ---: | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for kind, t in result["targets"].items():
        lines.append(
            f"| {kind} | {t['envoy_us']} | {t['stage_us']:.2f} | {_yes(t['met_stage'])} | "
            f"{t['p50_us']:+.1f} | {_yes(t['met_p50'])} | {t['cpu_us']:+.1f} | {_yes(t['met_cpu'])} |"
        )
    lines += [
        "",
        "| combination | stage: predicted / measured µs | error | p50: predicted / measured µs | error "
        "| CPU: predicted / measured µs | error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for combo, row in result["additivity"].items():
        cells = []
        for measure in ("stage", "p50", "cpu"):
            a = row[measure]
            mark = "" if a["met"] else " ✗"
            cells.append(
                f"{a['predicted_us']:.1f} / {a['measured_us']:.1f} | {_pct(a['error'])}{mark}"
            )
        lines.append(f"| {combo} ({'+'.join(COMBOS[combo])}) | " + " | ".join(cells) + " |")
    fixed = result["chain_fixed_cost_us"]
    if fixed:  # fault or ratelimit was run
        lines += [
            "",
            f"Chain fixed cost (outside the filter:* stages; min over fault, ratelimit of added "
            f"− stage): {fixed['p50']:.1f} µs p50, {fixed['cpu']:.1f} µs CPU per request. "
            "Counted once per combination instead of once per part:",
            "",
            "| combination | p50: predicted (one chain) / measured µs | error "
            "| CPU: predicted (one chain) / measured µs | error |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for combo, row in result["additivity"].items():
            cells = []
            for measure in ("p50", "cpu"):
                a = row[measure]
                mark = "" if a["met_one_chain"] else " ✗"
                cells.append(
                    f"{a['predicted_one_chain_us']:.1f} / {a['measured_us']:.1f} | "
                    f"{_pct(a['error_one_chain'])}{mark}"
                )
            lines.append(f"| {combo} | " + " | ".join(cells) + " |")
    lines.append(
        f"\n✗ = outside ±{ADDITIVITY_TOLERANCE * 100:.0f} %. "
        "Added p50 and CPU: paired = median over rounds of (configuration − baseline) in the same "
        "round (used for targets and additivity); pooled = all samples' figure − baseline's. "
        f"A/A control (baseline_b, an identical no-filter proxy): added p50 "
        f"{m['baseline_b']['p50']:+.1f} µs, added CPU {m['baseline_b']['cpu']:+.1f} µs/req (paired)."
    )
    if "baseline_tree" in result:
        lines += [
            "",
            f"This tree against the baseline tree ({result['baseline_tree']['path']}), same "
            "rounds, each against its own no-filter proxy (paired medians):",
            "",
            "| configuration | added p50 µs, this / baseline tree | ratio "
            "| added CPU µs/req, this / baseline tree | ratio |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for name, row in result["baseline_tree"]["added_us"].items():
            cells = []
            for measure in ("p50", "cpu"):
                a = row[measure]
                ratio = "—" if a["ratio"] is None else f"{a['ratio']:.2f} ×"
                cells.append(f"{a['this_tree_us']:+.1f} / {a['baseline_tree_us']:+.1f} | {ratio}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.get("foreign_cpus"):
        lines.append(noise_note(result["foreign_cpus"]))
    util = [u for v in load.values() for u in v["cpu_util_rounds"]]
    lines.append(
        f"Proxy CPU use under wrk -c8: {min(util) * 100:.0f}–{max(util) * 100:.0f} % of CPU 1."
    )
    if result["problems"]:
        lines.append("\n**Problems:**\n" + "\n".join(f"* {p}" for p in result["problems"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
