//! One PNG with three panels: reaction next to the flat-table reload, volume/raw per fio
//! pattern, assembly next to the kernel floor, each against the number of existing remaps.
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::report::{Report, Series};

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// A sans-serif font file, found by fontconfig; plotters draws text with it.
fn register_font() -> Result<()> {
    let out = Command::new("fc-match")
        .args(["-f", "%{file}", "sans-serif"])
        .output()
        .context("fc-match (fontconfig) is needed to find a font for the plot")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        bail!("fontconfig found no sans-serif font (install fonts-dejavu-core)");
    }
    let bytes = std::fs::read(&path).with_context(|| format!("reading font {path}"))?;
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{path} is not a usable font"))?;
    Ok(())
}

pub fn draw(path: &Path, r: &Report) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1800, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    panel(
        &panels[0],
        "Reaction vs flat-table reload (VM)",
        "ms",
        &r.plot_reaction,
        true,
    )?;
    panel(
        &panels[1],
        "Volume / raw IOPS (VM)",
        "ratio",
        &r.plot_ratio,
        false,
    )?;
    panel(
        &panels[2],
        "Assembly vs kernel floor (VM)",
        "ms",
        &r.plot_assembly,
        true,
    )?;
    root.present()?;
    Ok(())
}

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    unit: &str,
    series: &[Series],
    log: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    // The x axis is the list of background sizes, in order of first appearance.
    let mut xs: Vec<String> = Vec::new();
    for s in series {
        for (x, _) in &s.points {
            if !xs.contains(x) {
                xs.push(x.clone());
            }
        }
    }
    let vals: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite() && (!log || *v > 0.0))
        .collect();
    if xs.is_empty() || vals.is_empty() {
        area.titled(&format!("{title}: no data"), ("sans-serif", 22))?;
        return Ok(());
    }
    let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let n = xs.len() as f64;
    let label_x = |v: &f64| {
        let i = v.round();
        if (v - i).abs() < 0.01 && i >= 0.0 && (i as usize) < xs.len() {
            xs[i as usize].clone()
        } else {
            String::new()
        }
    };
    let mut chart = ChartBuilder::on(area);
    chart
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70);
    let idx = |x: &String| xs.iter().position(|y| y == x).unwrap_or(0) as f64;
    if log {
        let mut c = chart.build_cartesian_2d(-0.3f64..n - 0.7, (lo / 2.0..hi * 2.0).log_scale())?;
        c.configure_mesh()
            .x_labels(xs.len())
            .x_label_formatter(&label_x)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .light_line_style(RGBColor(235, 235, 235))
            .x_desc("existing remaps")
            .y_desc(unit)
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|p| p.1 > 0.0 && p.1.is_finite())
                .map(|(x, y)| (idx(x), *y))
                .collect();
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    } else {
        let lo = lo.min(0.9) - 0.02;
        let hi = hi.max(1.0) + 0.02;
        let mut c = chart.build_cartesian_2d(-0.3f64..n - 0.7, lo..hi)?;
        c.configure_mesh()
            .x_labels(xs.len())
            .x_label_formatter(&label_x)
            .y_label_formatter(&|v| format!("{v:.2}"))
            .light_line_style(RGBColor(235, 235, 235))
            .x_desc("existing remaps")
            .y_desc(unit)
            .draw()?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|(x, y)| (idx(x), *y))
                .collect();
            c.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(s.label.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            c.draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
        }
        c.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()?;
    }
    Ok(())
}
