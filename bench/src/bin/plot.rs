//! `plot`: draws the benchmark report's figure (an SVG) from the summary
//! `scripts/bench.sh` makes of its runs: for each scenario, crosswire next to
//! Bun, in three panels: deliveries per server CPU-second, p99 latency, and
//! server bytes per idle connection.
//!
//! Input: a JSON array of `{"scenario", "server", "per_cpu", "p99_ms",
//! "bytes_per_conn"}` (absent or null values are left out of their panel).

use std::{collections::BTreeSet, path::PathBuf};

use anyhow::Context as _;
use clap::Parser;
use plotters::prelude::*;
use serde::Deserialize;

/// Draws the benchmark figure from scripts/bench.sh's summary.
#[derive(Debug, Parser)]
struct Cli {
    /// The summary JSON.
    #[arg(long)]
    summary: PathBuf,
    /// The SVG to write.
    #[arg(long)]
    out: PathBuf,
    /// A caption line (machine, commit).
    #[arg(long, default_value = "")]
    caption: String,
}

#[derive(Debug, Deserialize)]
struct Row {
    scenario: String,
    server: String,
    per_cpu: Option<f64>,
    p99_ms: Option<f64>,
    bytes_per_conn: Option<f64>,
}

/// One panel: a value per (scenario, server), drawn as grouped bars.
struct Panel {
    title: &'static str,
    unit: &'static str,
    pick: fn(&Row) -> Option<f64>,
}

const PANELS: [Panel; 3] = [
    Panel { title: "deliveries per server CPU-second", unit: "M", pick: |r| r.per_cpu.map(|v| v / 1e6) },
    Panel { title: "p99 latency", unit: "ms", pick: |r| r.p99_ms },
    Panel { title: "server RSS per idle connection", unit: "KiB", pick: |r| r.bytes_per_conn.map(|v| v / 1024.0) },
];

fn colour(server: &str) -> RGBColor {
    match server {
        "crosswire" => RGBColor(0x2b, 0x6c, 0xb0),
        _ => RGBColor(0xd9, 0x8c, 0x1f),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rows: Vec<Row> =
        serde_json::from_slice(&std::fs::read(&cli.summary).with_context(|| format!("{:?}", cli.summary))?)?;
    let servers: Vec<String> = rows.iter().map(|r| r.server.clone()).collect::<BTreeSet<_>>().into_iter().collect();

    let root = SVGBackend::new(&cli.out, (1200, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(&format!("crosswire vs Bun  {}", cli.caption), ("sans-serif", 16))?;
    for (area, panel) in root.split_evenly((1, PANELS.len())).iter().zip(&PANELS) {
        let points: Vec<(String, String, f64)> =
            rows.iter().filter_map(|r| Some((r.scenario.clone(), r.server.clone(), (panel.pick)(r)?))).collect();
        let scenarios: Vec<String> = points.iter().map(|p| p.0.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        let top = points.iter().map(|p| p.2).fold(0.0, f64::max) * 1.15;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{} ({})", panel.title, panel.unit), ("sans-serif", 14))
            .margin(8)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..scenarios.len().max(1) as f64, 0.0..top.max(1e-9))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(scenarios.len().max(1) * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.01 {
                    scenarios.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()?;
        let width = 0.8 / servers.len().max(1) as f64;
        for (s, server) in servers.iter().enumerate() {
            let bars = points.iter().filter(|p| &p.1 == server).filter_map(|p| {
                let i = scenarios.iter().position(|x| x == &p.0)? as f64;
                let left = i + 0.1 + s as f64 * width;
                Some(Rectangle::new([(left, 0.0), (left + width * 0.9, p.2)], colour(server).filled()))
            });
            let fill = colour(server);
            chart
                .draw_series(bars)?
                .label(server.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], fill.filled()));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}
