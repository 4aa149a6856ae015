//! The report's plots as SVG files (plotters): eval loss against tokens for every row, and the
//! change against data-parallel as a function of M with ±1 standard deviation bars.

use crate::study::report::Row;
use plotters::prelude::*;
use std::path::Path;

/// A plot that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {why}")]
pub struct PlotError {
    path: String,
    why: String,
}

fn err(path: &Path) -> impl Fn(String) -> PlotError + '_ {
    move |why| PlotError {
        path: path.display().to_string(),
        why,
    }
}

/// Eval loss (mean over seeds) against training tokens, one line per row; the first tenth of
/// the tokens is left out so the part where the rows differ fills the plot. `false` (and no
/// file) when no row has an eval history of at least two points.
pub fn loss_vs_tokens(rows: &[Row], path: &Path, title: &str) -> Result<bool, PlotError> {
    let e = err(path);
    let max_tokens = rows
        .iter()
        .flat_map(|r| r.history.iter().map(|p| p.0))
        .fold(0.0f64, f64::max);
    let from = max_tokens * 0.1;
    let series: Vec<(&Row, Vec<(f64, f64)>)> = rows
        .iter()
        .map(|r| {
            let pts = r
                .history
                .iter()
                .copied()
                .filter(|p| p.0 >= from && p.1.is_finite())
                .collect::<Vec<_>>();
            (r, pts)
        })
        .filter(|(_, p)| p.len() >= 2)
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|q| q.1))
        .fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(from..max_tokens * 1.01, (lo - pad)..(hi + pad))
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("training tokens (all replicas)")
        .y_desc("eval loss (nats/byte)")
        .x_label_formatter(&|x| format!("{:.1}M", x / 1e6))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    for (i, (row, pts)) in series.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|x| e(x.to_string()))?
            .label(row.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(true)
}

/// The change against DP (percent) as a function of M, one line per setting of the other
/// axes, with ±1 standard deviation of the row's seeds (relative to the DP mean). `false`
/// when no DiLoCo row has a DP baseline.
pub fn vs_dp_by_m(rows: &[Row], path: &Path, title: &str) -> Result<bool, PlotError> {
    let e = err(path);
    let mut groups: Vec<(String, Vec<(f64, f64, f64)>)> = Vec::new();
    for r in rows.iter().filter(|r| r.mode != "dp") {
        let Some(p) = r.vs_dp else { continue };
        // The DP mean is loss / (1 + p/100); the bar is the row's std relative to it.
        let base = r.mean() / (1.0 + p / 100.0);
        let bar = r.std() / base * 100.0;
        let label = r
            .label()
            .split(' ')
            .filter(|w| !w.starts_with("M="))
            .collect::<Vec<_>>()
            .join(" ");
        match groups.iter_mut().find(|g| g.0 == label) {
            Some(g) => g.1.push((r.replicas as f64, p, bar)),
            None => groups.push((label, vec![(r.replicas as f64, p, bar)])),
        }
    }
    if groups.is_empty() {
        return Ok(false);
    }
    for g in &mut groups {
        g.1.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let all = groups.iter().flat_map(|g| g.1.iter());
    let (mut lo, mut hi, mut xmax) = (0.0f64, 0.0f64, 1.0f64);
    for &(m, p, bar) in all {
        lo = lo.min(p - bar);
        hi = hi.max(p + bar);
        xmax = xmax.max(m);
    }
    let pad = ((hi - lo) * 0.1).max(0.1);
    let root = SVGBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(x.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.5..xmax + 0.5, (lo - pad)..(hi + pad))
        .map_err(|x| e(x.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("replicas M")
        .y_desc("eval loss vs data-parallel (%)")
        .x_labels(xmax as usize + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|x| e(x.to_string()))?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.5, 0.0), (xmax + 0.5, 0.0)],
            BLACK.mix(0.5),
        ))
        .map_err(|x| e(x.to_string()))?
        .label("DP")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    for (i, (label, pts)) in groups.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                pts.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(|x| e(x.to_string()))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(pts.iter().map(|&(m, p, bar)| {
                ErrorBar::new_vertical(m, p - bar, p, p + bar, color.filled(), 8)
            }))
            .map_err(|x| e(x.to_string()))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(x.to_string()))?;
    root.present().map_err(|x| e(x.to_string()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::study::report::rows;
    use serde_json::json;

    #[test]
    fn plots_are_svg_with_every_row_in_the_legend() {
        let line = |mode: &str, m: u64, loss: f64| {
            json!({"config_key": format!("{mode}{m}"), "seed": 0, "mode": mode, "replicas": m,
                "inner_steps": 20, "outer_lr": if mode == "dp" { json!(null) } else { json!(0.6) },
                "batch": 16, "steps": 100, "codec": "int8", "drop_prob": 0.0, "eval_loss": loss,
                "eval_history": [{"step": 10, "tokens": 100, "eval_loss": loss + 2.0},
                    {"step": 50, "tokens": 500, "eval_loss": loss + 1.0},
                    {"step": 100, "tokens": 1000, "eval_loss": loss}]})
        };
        let rows = rows(&[
            line("dp", 1, 2.0),
            line("diloco", 2, 2.1),
            line("diloco", 4, 2.2),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.svg");
        assert!(loss_vs_tokens(&rows, &a, "t").unwrap());
        let svg = std::fs::read_to_string(&a).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        for label in ["DP b=16", "M=2 H=20 lr=0.6 int8", "M=4 H=20 lr=0.6 int8"] {
            assert!(svg.contains(label), "{label} not in the legend");
        }
        let b = dir.path().join("b.svg");
        assert!(vs_dp_by_m(&rows, &b, "t").unwrap());
        assert!(std::fs::read_to_string(&b)
            .unwrap()
            .contains("H=20 lr=0.6 int8"));
        // Nothing to plot: no file, and false.
        let c = dir.path().join("c.svg");
        assert!(!vs_dp_by_m(&rows[..1], &c, "t").unwrap());
        assert!(!c.exists());
    }
}
