//! Following a deployment on the terminal: two progress bars (nodes holding the release,
//! nodes running it) and a line for each transition of its history, for `starling deploy
//! --wait`, `starling rollback --wait` and the demo.

use anyhow::{anyhow, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use starling_client::ControlClient;
use starling_proto::DeploymentView;

pub struct Follower<'a> {
    client: &'a ControlClient,
    id: u64,
    bars: MultiProgress,
    staged: ProgressBar,
    running: ProgressBar,
    shown: usize,
    say: &'a dyn Fn(String),
}

impl<'a> Follower<'a> {
    /// `say` prints a line (the bars step aside for it).
    pub fn new(client: &'a ControlClient, id: u64, say: &'a dyn Fn(String)) -> Result<Self> {
        let style = ProgressStyle::with_template("  {prefix:>8} [{bar:30}] {pos}/{len} {msg}")
            .map_err(|e| anyhow!("{e}"))?
            .progress_chars("=> ");
        let bars = MultiProgress::new();
        let staged = bars.add(
            ProgressBar::new(0)
                .with_style(style.clone())
                .with_prefix("staged"),
        );
        let running = bars.add(ProgressBar::new(0).with_style(style).with_prefix("running"));
        Ok(Follower {
            client,
            id,
            bars,
            staged,
            running,
            shown: 0,
            say,
        })
    }

    /// Read the deployment once: the bars move, new transitions are printed. The bars
    /// are finished once the deployment is.
    pub async fn poll(&mut self) -> Result<DeploymentView> {
        let v = self.client.deployment(self.id).await?;
        let (d, p) = (&v.deployment, &v.progress);
        for bar in [&self.staged, &self.running] {
            bar.set_length(p.nodes as u64);
        }
        self.staged.set_position(p.staged as u64);
        self.running.set_position(p.running as u64);
        let wave = d.current_wave().filter(|_| !d.status.is_final());
        self.running.set_message(
            wave.map(|i| format!("wave {}", d.waves[i].name))
                .unwrap_or_default(),
        );
        for t in d.history.iter().skip(self.shown) {
            let wave = t.wave.and_then(|i| d.waves.get(i)).map(|w| w.name.as_str());
            let line = format!(
                "deployment {}: {}{}{}",
                self.id,
                t.what.replace('_', " "),
                wave.map(|w| format!(" ({w})")).unwrap_or_default(),
                t.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
            self.say(line);
        }
        self.shown = d.history.len();
        if d.status.is_final() {
            self.staged.finish();
            self.running.finish();
        }
        Ok(v)
    }

    /// Print `line` with the bars out of the way.
    pub fn say(&self, line: String) {
        self.bars.suspend(|| (self.say)(line));
    }
}
