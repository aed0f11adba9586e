//! The printed report: one table per phase (a row per target), a table of
//! archmerge's own figures, archmerge's CPU beside each peer's, and the
//! goals marked met or MISSED.

/// Median and range of a figure over the repeats of a phase.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    /// Of the finite values in `v` (NaN everywhere when there are none).
    pub fn of(v: &[f64]) -> Spread {
        let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n: 0,
            };
        }
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[m]
        } else {
            (v[m - 1] + v[m]) / 2.0
        };
        Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        }
    }

    /// `median [min–max]`, or `-` when nothing was measured.
    pub fn show(&self, decimals: usize) -> String {
        if self.n == 0 {
            return "-".into();
        }
        let d = decimals;
        if self.n == 1 {
            return format!("{:.d$}", self.median);
        }
        format!("{:.d$} [{:.d$}–{:.d$}]", self.median, self.min, self.max)
    }
}

/// A number, or `-`.
pub fn num(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "-".into()
    }
}

/// The value at quantile `p` of `v` (sorted here), NaN when empty.
pub fn quantile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One table: a title, column headers, rows of cells.
pub struct Table {
    title: String,
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, headers: &[&str]) -> Table {
        Table {
            title: title.into(),
            headers: headers.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn print(&self) {
        let cols = self.headers.len();
        let mut width = vec![0; cols];
        for r in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let line = |r: &[String]| {
            let mut out = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = r.get(i).map_or("", String::as_str);
                let pad = w - c.chars().count();
                if i == 0 {
                    out.push_str(c);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str("   ");
                    out.push_str(&" ".repeat(pad));
                    out.push_str(c);
                }
            }
            out.trim_end().to_owned()
        };
        println!();
        println!("{}", self.title);
        let head = line(&self.headers);
        println!("{head}");
        println!("{}", "-".repeat(head.chars().count()));
        for r in &self.rows {
            println!("{}", line(r));
        }
    }
}

/// archmerge's CPU per unit of one phase beside each peer's.
pub struct Versus {
    pub figure: String,
    pub archmerge: f64,
    /// (peer, its figure).
    pub peers: Vec<(&'static str, f64)>,
    pub decimals: usize,
}

/// Everything the run measured, printed at the end.
#[derive(Default)]
pub struct Results {
    pub tables: Vec<Table>,
    /// archmerge's own figures: (figure, value).
    pub figures: Vec<(String, String)>,
    pub versus: Vec<Versus>,
    /// (goal, measured, met).
    pub goals: Vec<(String, String, bool)>,
    pub notes: Vec<String>,
}

impl Results {
    pub fn figure(&mut self, figure: impl Into<String>, value: String) {
        self.figures.push((figure.into(), value));
    }

    pub fn goal(&mut self, goal: &str, measured: String, met: bool) {
        self.goals.push((goal.to_owned(), measured, met));
    }

    pub fn print(&self) {
        for t in &self.tables {
            t.print();
        }
        if !self.figures.is_empty() {
            let mut t = Table::new("archmerge's own figures", &["figure", "value"]);
            for (f, v) in &self.figures {
                t.row(vec![f.clone(), v.clone()]);
            }
            t.print();
        }
        if !self.versus.is_empty() {
            let peers: Vec<&str> = self
                .versus
                .first()
                .map(|v| v.peers.iter().map(|p| p.0).collect())
                .unwrap_or_default();
            let mut headers = vec!["proxy CPU per unit (medians)", "archmerge"];
            let cols: Vec<String> = peers.iter().map(|p| format!("{p} (am/{p})")).collect();
            headers.extend(cols.iter().map(String::as_str));
            headers.push("below all");
            let mut t = Table::new("archmerge's CPU beside each peer's", &headers);
            for v in &self.versus {
                let (am, d) = (&v.archmerge, &v.decimals);
                let others = &v.peers;
                let mut cells = vec![v.figure.clone(), num(*am, *d)];
                for (_, v) in others {
                    let ratio = if *v > 0.0 && am.is_finite() {
                        format!("{:.2}", am / v)
                    } else {
                        "-".into()
                    };
                    cells.push(format!("{} ({ratio})", num(*v, *d)));
                }
                let below = others.iter().all(|(_, v)| am < v);
                cells.push(if below { "yes" } else { "no" }.into());
                t.row(cells);
            }
            t.print();
        }
        println!();
        println!("goals:");
        for (g, m, met) in &self.goals {
            println!("  [{}] {g}: {m}", if *met { "met" } else { "MISSED" });
        }
        for n in &self.notes {
            println!("note: {n}");
        }
    }
}
