//! The comparison chart: for every workload, throughput and p99 latency against client count,
//! kvset and etcd, drawn with plotters into a PNG.

use std::path::Path;

use plotters::prelude::*;

use crate::compare::Cell;

/// Fonts tried, in order, for the chart's text (Debian: fonts-dejavu-core).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> Result<(), String> {
    for path in FONTS {
        if let Ok(bytes) = std::fs::read(path) {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a usable font"));
        }
    }
    Err(format!("no font for the chart; install fonts-dejavu-core (looked in {FONTS:?})"))
}

/// Draws `cells` into `path` (PNG).
pub fn draw(cells: &[Cell], path: &Path) -> Result<(), String> {
    register_font()?;
    let mut workloads: Vec<String> = cells.iter().map(|c| c.workload.clone()).collect();
    workloads.dedup();
    let width = 420 * workloads.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 760)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((2, workloads.len().max(1)));
    for (col, workload) in workloads.iter().enumerate() {
        let mine: Vec<&Cell> = cells.iter().filter(|c| &c.workload == workload).collect();
        let xs: Vec<f64> = mine.iter().map(|c| c.clients as f64).collect();
        let (xmin, xmax) =
            (xs.iter().cloned().fold(f64::MAX, f64::min), xs.iter().cloned().fold(0.0, f64::max));
        for (row, (title, pick)) in [
            ("ops/s", (|r: &crate::Report| r.ops_per_sec) as fn(&crate::Report) -> f64),
            ("p99 ms", |r: &crate::Report| r.latency.p99_us as f64 / 1000.0),
        ]
        .into_iter()
        .enumerate()
        {
            let area = &panels[row * workloads.len() + col];
            let ymax = mine
                .iter()
                .flat_map(|c| [pick(&c.kvset), pick(&c.etcd), pick(&c.kvset_v1)])
                .fold(0.0, f64::max)
                * 1.15
                + 1e-9;
            let mut chart = ChartBuilder::on(area)
                .caption(format!("{workload}: {title}"), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(56)
                .build_cartesian_2d(
                    (xmin.max(1.0)..xmax.max(2.0)).log_scale().with_key_points(xs.clone()),
                    0.0..ymax,
                )
                .map_err(|e| e.to_string())?;
            chart
                .configure_mesh()
                .x_desc("clients")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| {
                    if *y >= 1000.0 {
                        format!("{:.1}k", y / 1000.0)
                    } else {
                        format!("{y:.0}")
                    }
                })
                .light_line_style(WHITE)
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(|e| e.to_string())?;
            for (name, color, get) in [
                ("kvset", &BLUE, (|c: &Cell| &c.kvset) as fn(&Cell) -> &crate::Report),
                ("etcd", &RED, |c: &Cell| &c.etcd),
                ("kvset.v1", &GREEN, |c: &Cell| &c.kvset_v1),
            ] {
                let points: Vec<(f64, f64)> = mine.iter().map(|c| (c.clients as f64, pick(get(c)))).collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
                chart
                    .draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                    .map_err(|e| e.to_string())?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(|e| e.to_string())?;
        }
    }
    root.present().map_err(|e| e.to_string())
}
