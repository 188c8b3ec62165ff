//! The summary tables a control-plane run prints: columns as wide as their widest cell, the first
//! left-aligned (what is measured), the others right-aligned (figures).

pub struct Table {
    head: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(head: &[&str]) -> Self {
        Self { head: head.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    /// Adds a row; missing cells are empty, extra ones are dropped.
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        let mut r: Vec<String> = cells.into_iter().map(Into::into).take(self.head.len()).collect();
        r.resize(self.head.len(), String::new());
        self.rows.push(r);
    }

    /// The table as text, each line indented by two spaces, a rule under the header.
    pub fn render(&self) -> String {
        let width = |i: usize| {
            self.rows.iter().map(|r| r[i].chars().count()).chain([self.head[i].chars().count()]).max().unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.head.len()).map(width).collect();
        let line = |cells: &[String]| {
            let mut s = String::from(" ");
            for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
                s.push(' ');
                if i == 0 {
                    s.push_str(&format!("{c:<w$}"));
                } else {
                    s.push_str(&format!(" {c:>w$}"));
                }
            }
            s.trim_end().to_string()
        };
        let mut out = vec![line(&self.head)];
        let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        out.push(line(&rule));
        out.extend(self.rows.iter().map(|r| line(r)));
        out.join("\n")
    }
}

/// `x / y` as `1.23x`; `-` when either is not a measured figure or `y` is 0.
pub fn ratio(x: f64, y: f64) -> String {
    if x.is_finite() && y.is_finite() && y != 0.0 {
        format!("{:.2}x", x / y)
    } else {
        "-".into()
    }
}

/// A figure with two decimals and its unit (`-` when not measured).
pub fn fig(x: f64, unit: &str) -> String {
    if x.is_finite() {
        // no "-0.00"
        let x = x + 0.0;
        format!("{x:.2} {unit}").trim_end().to_string()
    } else {
        "-".into()
    }
}

/// KiB as MiB, one decimal.
pub fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// A count with thousands separators (10,000).
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_to_the_widest_cell() {
        let mut t = Table::new(&["what", "on", "off"]);
        t.row(["p50", "2.86 ms", "2.80 ms"]);
        t.row(["RSS root, mean", "35.7 MiB"]);
        let want = "  what                  on      off\n  \
                    --------------  --------  -------\n  \
                    p50              2.86 ms  2.80 ms\n  \
                    RSS root, mean  35.7 MiB";
        assert_eq!(t.render(), want);
    }

    #[test]
    fn extra_cells_are_dropped() {
        let mut t = Table::new(&["a"]);
        t.row(["x", "y"]);
        assert_eq!(t.render(), "  a\n  -\n  x");
    }

    #[test]
    fn ratios_and_figures() {
        assert_eq!(ratio(3.0, 2.0), "1.50x");
        assert_eq!(ratio(1.0, 0.0), "-");
        assert_eq!(ratio(f64::NAN, 1.0), "-");
        assert_eq!(fig(2.856, "ms"), "2.86 ms");
        assert_eq!(fig(f64::NAN, "ms"), "-");
        assert_eq!(fig(12.0, ""), "12.00");
        assert_eq!(mib(36557), "35.7 MiB");
    }

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(10000), "10,000");
        assert_eq!(count(1234567), "1,234,567");
    }
}
