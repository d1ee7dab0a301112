//! The report: markdown tables (pasted into BENCHMARKS.md), issue 11's targets as met or missed,
//! and a hand-written SVG plot of throughput against concurrency.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::redis_path::{ContenderResult, RedisPathResult};
use crate::{Machine, Results, probe::NoiseReading};

fn rate(per_second: f64) -> String {
    if !per_second.is_finite() {
        "-".into()
    } else if per_second >= 1_000.0 {
        format!("{:.1} k/s", per_second / 1_000.0)
    } else {
        format!("{per_second:.0}/s")
    }
}

fn ratio(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.2}"))
}

fn micros(us: f64) -> String {
    if !us.is_finite() {
        "-".into()
    } else if us >= 1_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else if us >= 10.0 {
        format!("{us:.0} µs")
    } else {
        format!("{us:.2} µs")
    }
}

fn commands(counts: &BTreeMap<String, f64>) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    let total: f64 = counts.values().sum();
    let names: Vec<String> = counts
        .iter()
        .map(|(name, n)| {
            if (n - 1.0).abs() < 0.005 {
                name.to_uppercase()
            } else {
                format!("{n:.2}× {}", name.to_uppercase())
            }
        })
        .collect();
    format!("**{total:.2}**: {}", names.join(", "))
}

fn noise_line(section: &str, noise: &NoiseReading) -> String {
    format!(
        "| {section} | {:.0} s | {:.2} | {:.2} | {:.2} → {:.2} |",
        noise.seconds, noise.other_cores, noise.steal_cores, noise.loadavg_start, noise.loadavg_end
    )
}

/// Whether the run was quiet enough to stand as figures: the load average before the bench
/// started below 0.5 and, in every section, other processes using under a tenth of a core.
pub fn quiet(results: &Results) -> bool {
    let before: f64 = results
        .machine
        .loadavg_at_start
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(f64::INFINITY);
    before < 0.5
        && noises(results)
            .iter()
            .all(|(_, n)| n.other_cores < 0.1 && n.steal_cores < 0.1)
}

fn noises(results: &Results) -> Vec<(&'static str, &NoiseReading)> {
    let mut all = Vec::new();
    if let Some(r) = &results.redis {
        all.push(("Redis path", &r.noise));
    }
    if let Some(r) = &results.inproc {
        all.push(("in process", &r.noise));
    }
    if let Some(r) = &results.contention {
        all.push(("contention", &r.noise));
    }
    if let Some(r) = &results.http {
        all.push(("HTTP", &r.noise));
    }
    if let Some(r) = &results.memory {
        all.push(("memory", &r.noise));
    }
    all
}

pub fn markdown(results: &Results) -> String {
    let mut md = String::new();
    let m = &results.machine;
    let _ = writeln!(md, "## Figures of {}", m.date);
    let _ = writeln!(md);
    if results.smoke {
        let _ = writeln!(
            md,
            "**Smoke run (no `--bench`): tiny sizes, the figures mean nothing.**\n"
        );
    }
    let _ = writeln!(md, "- Command: `{}`", results.command);
    let _ = writeln!(
        md,
        "- Machine: {} cores (`nproc`), {}, Linux {}; {}",
        m.nproc, m.cpu, m.kernel, m.redis_server
    );
    let _ = writeln!(
        md,
        "- Build: {}, commit {}; the whole run took {:.0} s",
        m.rustc, m.commit, results.seconds
    );
    let verdict = if quiet(results) {
        "quiet: load average below 0.5 before the run, and other processes (and steal) under 0.1 \
         core in every section"
    } else {
        "**noisy: to be re-run on a quiet machine** (other processes were busy, see below)"
    };
    let _ = writeln!(
        md,
        "- Load average before the run: {} — {verdict}",
        m.loadavg_at_start
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "| section | took | CPU of other processes (cores, average) | steal (cores) | load average (1 min, includes the bench) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for (section, noise) in noises(results) {
        let _ = writeln!(md, "{}", noise_line(section, noise));
    }
    let _ = writeln!(md);

    if let Some(redis) = &results.redis {
        redis_tables(&mut md, redis);
    }
    if let Some(inproc) = &results.inproc {
        let _ = writeln!(
            md,
            "### In process ({} requests in a row per round, median of {} rounds)\n",
            inproc.ops, inproc.rounds
        );
        let bare = inproc
            .contenders
            .iter()
            .find(|c| c.id == "bare")
            .map_or(f64::NAN, |c| c.ns_median);
        let _ = writeln!(
            md,
            "| contender | ns per request | over bare | allocations per request | bytes allocated per request | failures |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for c in &inproc.contenders {
            let _ = writeln!(
                md,
                "| {} | {:.0} ns | {:+.0} ns | {:.1} | {:.0} | {} |",
                c.label,
                c.ns_median,
                c.ns_median - bare,
                c.allocations,
                c.allocated_bytes,
                c.failures
            );
        }
        let _ = writeln!(md);
    }
    if let Some(contention) = &results.contention {
        let _ = writeln!(
            md,
            "### Contention ({} concurrent requests on one held key, median of {} rounds)\n",
            contention.requests,
            contention.layer.rounds.len()
        );
        let _ = writeln!(
            md,
            "| | refusals (fewest in a round) | p50 | p99 | max | Redis calls per refusal (commandstats) | client commands per refusal (MONITOR) | inside scripts | Redis CPU per refusal |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
        for s in [&contention.layer, &contention.raw] {
            let _ = writeln!(
                md,
                "| {} | {} / {} | {} | {} | {} | {:.2} | {} | {} | {} |",
                s.label,
                s.conflicts_min,
                contention.requests,
                micros(s.p50_us),
                micros(s.p99_us),
                micros(s.max_us),
                s.server_calls,
                commands(&s.client_commands),
                commands(&s.script_commands),
                micros(s.redis_cpu_us)
            );
        }
        let _ = writeln!(md);
    }
    if let Some(http) = &results.http {
        let _ = writeln!(
            md,
            "### HTTP end to end ({}, median of {} rounds of {} s)\n",
            http.load_generator, http.rounds, http.seconds
        );
        let _ = writeln!(md, "`{}`\n", http.command);
        let _ = writeln!(
            md,
            "| route | requests/s | p50 | p99 | ÷ its unlocked twin | non-2xx | socket errors |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for r in &http.routes {
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} ms | {:.2} ms | {} | {} | {} |",
                r.label,
                rate(r.per_second),
                r.p50_ms,
                r.p99_ms,
                ratio(r.vs_unlocked),
                r.non_2xx,
                r.socket_errors
            );
        }
        let _ = writeln!(md);
    } else if let Some(why) = &results.http_skipped {
        let _ = writeln!(md, "### HTTP end to end\n\nSkipped: {why}.\n");
    }
    if let Some(memory) = &results.memory {
        let r = &memory.result;
        let _ = writeln!(
            md,
            "### Memory ({}, a fresh process, {} requests at a time, each on its own key; RSS after a {}-request warm-up: {:.1} MiB)\n",
            r.backend,
            r.concurrency,
            r.warm_up,
            r.rss_after_warm_up_kib as f64 / 1024.0
        );
        let _ = writeln!(
            md,
            "| requests after warm-up | RSS | heap still allocated since warm-up | locks held | requests/s |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for s in &r.steps {
            let _ = writeln!(
                md,
                "| {} | {:.1} MiB | {:.1} KiB | {} | {} |",
                s.requests,
                s.rss_kib as f64 / 1024.0,
                s.heap_growth_bytes as f64 / 1024.0,
                s.held,
                rate(s.per_second)
            );
        }
        let _ = writeln!(md);
    }
    targets(&mut md, results);
    md
}

fn redis_tables(md: &mut String, redis: &RedisPathResult) {
    let levels = &redis.concurrency;
    let header = |first: &str| {
        let mut line = format!("| {first} |");
        for c in levels {
            let _ = write!(line, " {c} |");
        }
        line.push('\n');
        line.push_str(&"|---".repeat(levels.len() + 1));
        line.push_str("|\n");
        line
    };
    let _ = writeln!(
        md,
        "### Redis path: lock + unlock pairs per second ({} pairs per contender per concurrency, \
         median of {} interleaved rounds (min–max in k/s); {} tokio workers; distinct keys)\n",
        redis.ops, redis.rounds, redis.workers
    );
    md.push_str(&header("contender \\ concurrency"));
    for c in &redis.contenders {
        let _ = write!(md, "| {} |", c.label);
        for cell in &c.cells {
            let _ = write!(
                md,
                " {} ({:.1}–{:.1}) |",
                rate(cell.per_second),
                cell.per_second_min / 1_000.0,
                cell.per_second_max / 1_000.0
            );
        }
        md.push('\n');
    }
    let failures: u64 = redis
        .contenders
        .iter()
        .flat_map(|c| &c.cells)
        .map(|cell| cell.failures)
        .sum();
    if failures > 0 {
        let _ = writeln!(
            md,
            "\n**{failures} operations failed** (not acquired, not released, or an error): see results.json."
        );
    }
    let _ = writeln!(
        md,
        "\n![throughput against concurrency](benches/plot/throughput.svg)\n"
    );

    let _ = writeln!(
        md,
        "Ratios: the median over rounds of the contender's throughput divided by the raw pair's \
         (then rslock's) in the same round.\n"
    );
    md.push_str(&header("÷ raw pair"));
    for c in &redis.contenders {
        let _ = write!(md, "| {} |", c.label);
        for cell in &c.cells {
            let _ = write!(md, " {} |", ratio(cell.vs_raw));
        }
        md.push('\n');
    }
    md.push('\n');
    md.push_str(&header("÷ rslock"));
    for c in &redis.contenders {
        let _ = write!(md, "| {} |", c.label);
        for cell in &c.cells {
            let _ = write!(md, " {} |", ratio(cell.vs_rslock));
        }
        md.push('\n');
    }
    md.push('\n');

    let _ = writeln!(
        md,
        "Redis CPU per pair (`used_cpu_sys + used_cpu_user` deltas of the contender's own \
         server, median over rounds) / this process's CPU per pair (all threads):\n"
    );
    md.push_str(&header("Redis / client CPU"));
    for c in &redis.contenders {
        let _ = write!(md, "| {} |", c.label);
        for cell in &c.cells {
            let _ = write!(
                md,
                " {} / {} |",
                micros(cell.redis_cpu_us),
                micros(cell.client_cpu_us)
            );
        }
        md.push('\n');
    }
    md.push('\n');

    let _ = writeln!(
        md,
        "Redis commands per pair. \"Client\" and \"inside scripts\" come from an untimed pass of \
         {} pairs at concurrency 16 with `MONITOR` attached (an `EVALSHA` counts once as a \
         client command; the `redis.call`s it makes are listed as inside scripts). \"At the \
         server\" is the `INFO commandstats` delta of the timed rounds (median), which counts \
         both. Allocations: the whole process during the same untimed pass.\n",
        redis.contenders.first().map_or(0, |c| c.calibration.ops)
    );
    let _ = writeln!(
        md,
        "| contender | client commands | inside scripts | at the server (commandstats) | allocations per pair | bytes allocated per pair |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for c in &redis.contenders {
        let calls: Vec<f64> = c.cells.iter().map(|cell| cell.server_calls).collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.1} | {:.0} |",
            c.label,
            commands(&c.calibration.client_commands),
            commands(&c.calibration.script_commands),
            crate::median(&calls).unwrap_or(f64::NAN),
            c.calibration.allocations,
            c.calibration.allocated_bytes
        );
    }
    md.push('\n');
}

fn find<'a>(redis: &'a RedisPathResult, id: &str) -> Option<&'a ContenderResult> {
    redis.contenders.iter().find(|c| c.id == id)
}

/// Issue 11's targets, each as met or missed in this run.
fn targets(md: &mut String, results: &Results) {
    let mut rows: Vec<(String, String, String, Option<bool>)> = Vec::new();
    if let Some(redis) = &results.redis
        && let (Some(raw), Some(rslock)) = (find(redis, "raw"), find(redis, "rslock"))
    {
        for (id, cpu_target, raw_target, rslock_target) in [
            ("layer_no_fencing", 1.15, 0.9, 1.2),
            ("layer", 1.4, 0.8, 1.1),
        ] {
            let Some(layer) = find(redis, id) else {
                continue;
            };
            // Redis CPU: the worst level, and every level.
            let per_level: Vec<(usize, f64)> = layer
                .cells
                .iter()
                .zip(&raw.cells)
                .map(|(l, r)| (l.concurrency, l.redis_cpu_us / r.redis_cpu_us))
                .collect();
            let worst = per_level.iter().map(|&(_, r)| r).fold(f64::NAN, f64::max);
            let levels: Vec<String> = per_level
                .iter()
                .map(|(c, r)| format!("{r:.2} at {c}"))
                .collect();
            rows.push((
                format!("Redis CPU per request, {}", layer.label),
                format!("≤ {cpu_target}× raw"),
                format!("worst {worst:.2}× ({})", levels.join(", ")),
                worst.is_finite().then_some(worst <= cpu_target),
            ));
            for cell in layer.cells.iter().filter(|c| c.concurrency > 1) {
                let (to_raw, to_rslock) = (cell.vs_raw, cell.vs_rslock);
                rows.push((
                    format!("throughput at {}, {}", cell.concurrency, layer.label),
                    format!("≥ {raw_target}× raw, ≥ {rslock_target}× rslock"),
                    format!("{} raw, {} rslock", ratio(to_raw), ratio(to_rslock)),
                    to_raw
                        .zip(to_rslock)
                        .map(|(a, b)| a >= raw_target && b >= rslock_target),
                ));
            }
            if let Some(cell) = layer.cells.iter().find(|c| c.concurrency == 1) {
                rows.push((
                    format!("throughput at 1, {}", layer.label),
                    "ahead of rslock".into(),
                    format!("{} rslock", ratio(cell.vs_rslock)),
                    cell.vs_rslock.map(|r| r > 1.0),
                ));
            }
            let client: f64 = layer.calibration.client_commands.values().sum();
            rows.push((
                format!("client commands per uncontended request, {}", layer.label),
                "exactly 2".into(),
                format!("{client:.2}"),
                Some((client - 2.0).abs() < 0.005),
            ));
        }
        let _ = rslock;
    }
    if let Some(inproc) = &results.inproc {
        let ns = |id: &str| {
            inproc
                .contenders
                .iter()
                .find(|c| c.id == id)
                .map(|c| c.ns_median)
        };
        if let (Some(layer), Some(bare)) = (ns("layer_memory"), ns("bare")) {
            let over = layer - bare;
            rows.push((
                "in-process overhead over the bare service".into(),
                "≤ 1 µs".into(),
                format!("{:.2} µs", over / 1_000.0),
                Some(over <= 1_000.0),
            ));
        }
    }
    if let Some(http) = &results.http {
        for locked in http.routes.iter().filter(|r| r.target) {
            rows.push((
                format!("HTTP throughput, {} ÷ unlocked", locked.label),
                "≥ 0.85".into(),
                ratio(locked.vs_unlocked),
                locked.vs_unlocked.map(|r| r >= 0.85),
            ));
        }
    }
    if let Some(contention) = &results.contention {
        let client: f64 = contention.layer.client_commands.values().sum();
        rows.push((
            "client commands per 409".into(),
            "exactly 1".into(),
            format!("{client:.2}"),
            Some((client - 1.0).abs() < 0.005),
        ));
    }
    if let Some(memory) = &results.memory {
        let steps = &memory.result.steps;
        if let (Some(first), Some(last)) = (steps.first(), steps.last())
            && steps.len() > 1
        {
            let growth = last.rss_kib as f64 - first.rss_kib as f64;
            rows.push((
                format!(
                    "flat RSS ({} → {} requests, MemoryBackend)",
                    first.requests, last.requests
                ),
                "grows ≤ 1 MiB".into(),
                format!("{:+.1} MiB", growth / 1024.0),
                Some(growth <= 1024.0),
            ));
        }
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(md, "### Issue 11's targets in this run\n");
    let _ = writeln!(md, "| target | wanted | this run | |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (what, wanted, got, met) in rows {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "-",
        };
        let _ = writeln!(md, "| {what} | {wanted} | {got} | {verdict} |");
    }
    md.push('\n');
}

// ---------------------------------------------------------------------------------------------
// The plot.

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A round step for about five ticks up to `max`.
fn tick_step(max: f64) -> f64 {
    let raw = (max / 5.0).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction <= 1.0 {
        1.0
    } else if fraction <= 2.0 {
        2.0
    } else if fraction <= 2.5 {
        2.5
    } else if fraction <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

const COLOURS: [&str; 8] = [
    "#d62728", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c", "#7f7f7f", "#8c564b", "#e377c2",
];

/// Throughput (k pairs/s) against concurrency (log scale), one line per contender, with the
/// min–max range of the rounds as a bar at each point.
pub fn throughput_svg(redis: &RedisPathResult, machine: &Machine, quiet: bool) -> String {
    let (width, height) = (900.0, 520.0);
    let (left, right, top, bottom) = (70.0, 250.0, 64.0, 56.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let levels = &redis.concurrency;
    let x_of = |c: usize| (c.max(1) as f64).log2();
    let (x_min, x_max) = (
        levels
            .iter()
            .map(|&c| x_of(c))
            .fold(f64::INFINITY, f64::min),
        levels
            .iter()
            .map(|&c| x_of(c))
            .fold(f64::NEG_INFINITY, f64::max),
    );
    let x_span = if x_max > x_min { x_max - x_min } else { 1.0 };
    let y_max_data = redis
        .contenders
        .iter()
        .flat_map(|c| &c.cells)
        .map(|cell| cell.per_second / 1_000.0)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        * 1.1;
    let step = tick_step(y_max_data.max(1.0));
    let y_max = (y_max_data / step).ceil().max(1.0) * step;
    let px = |c: usize| left + (x_of(c) - x_min) / x_span * plot_w;
    let py = |k: f64| top + plot_h - (k / y_max).clamp(0.0, 1.0) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="24" font-size="15" font-weight="bold">Redis path: lock + unlock pairs per second against concurrency</text>"#
    );
    let _ = writeln!(
        svg,
        r##"<text x="{left}" y="44" fill="#555">{}</text>"##,
        escape(&format!(
            "median of {} rounds of {} pairs, distinct keys; {} cores ({}), {}; {}",
            redis.rounds,
            redis.ops,
            machine.nproc,
            machine.cpu,
            machine.redis_server.split(" sha=").next().unwrap_or(""),
            machine.date
        ))
    );
    if !quiet {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="24" fill="#b00" text-anchor="end">noisy machine: to be re-run on a quiet one</text>"##,
            width - 10.0
        );
    }
    // Grid and axes.
    let mut k = 0.0;
    while k <= y_max + step / 2.0 {
        let y = py(k);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 8.0,
            y + 4.0,
            if step < 1.0 {
                format!("{k:.1}")
            } else {
                format!("{k:.0}")
            }
        );
        k += step;
    }
    for &c in levels {
        let x = px(c);
        let _ = writeln!(
            svg,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#eeeeee"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{c}</text>"##,
            top + plot_h,
            top + plot_h + 18.0
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">concurrent tasks (log scale)</text>"#,
        left + plot_w / 2.0,
        height - 14.0
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">thousand pairs per second</text>"#,
        top + plot_h / 2.0
    );
    // Series.
    for (i, c) in redis.contenders.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let dash = if c.id == "naive" {
            r#" stroke-dasharray="5 4""#
        } else {
            ""
        };
        let points: Vec<String> = c
            .cells
            .iter()
            .filter(|cell| cell.per_second.is_finite())
            .map(|cell| {
                format!(
                    "{:.1},{:.1}",
                    px(cell.concurrency),
                    py(cell.per_second / 1_000.0)
                )
            })
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
            points.join(" ")
        );
        // Each series' range bars a little apart, so that they do not hide one another.
        let offset = (i as f64 - (redis.contenders.len() as f64 - 1.0) / 2.0) * 3.0;
        for cell in c.cells.iter().filter(|cell| cell.per_second.is_finite()) {
            let x = px(cell.concurrency);
            let _ = writeln!(
                svg,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-opacity="0.5" stroke-width="1.5"/><circle cx="{x:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{}: {} at concurrency {}</title></circle>"#,
                x + offset,
                py(cell.per_second_min / 1_000.0),
                x + offset,
                py(cell.per_second_max / 1_000.0),
                py(cell.per_second / 1_000.0),
                escape(c.label),
                rate(cell.per_second),
                cell.concurrency
            );
        }
        let ly = top + 10.0 + i as f64 * 22.0;
        let lx = left + plot_w + 20.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><circle cx="{:.1}" cy="{ly:.1}" r="3.5" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            lx + 24.0,
            lx + 12.0,
            lx + 32.0,
            ly + 4.0,
            escape(c.short)
        );
    }
    let (x, y) = (
        left + plot_w + 20.0,
        top + 10.0 + redis.contenders.len() as f64 * 22.0 + 8.0,
    );
    let _ = writeln!(
        svg,
        r##"<text x="{x:.1}" y="{y:.1}" fill="#555">bars: min–max over rounds</text><text x="{x:.1}" y="{:.1}" fill="#555">(clipped at the top)</text>"##,
        y + 16.0
    );
    svg.push_str("</svg>\n");
    svg
}
