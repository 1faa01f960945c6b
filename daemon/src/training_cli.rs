//! `rigctl`'s training commands: `mouse add|show|list|edit`, `history`,
//! `report`, `water give`. They work on the data root directly, not through
//! rigd's socket: the mouse records and session folders are the truth and
//! are shared by every rig on the data root, so a cohort can be added, and
//! its history read, from any machine that mounts it, with rigd running or
//! not. Writes are crash-safe (`subject.toml` replaced atomically,
//! `water.tsv` appended line by line with fsync), so a rigd reading them at a
//! start sees the old record or the new one.
//!
//! The data root, the lab's zone, the protocol and the water target come
//! from the rig's configuration (the same `rig.toml` rigd runs), so rigctl
//! and rigd agree on what "today" is.

use std::path::{Path, PathBuf};

use rig_config::RigConfig;
use training::{LabZone, Subject};

/// Where the configuration is when nothing else says.
pub const DEFAULT_CONFIG: &str = "/etc/rigd/rig.toml";

/// The training commands' view of the rig: its data root, zone and water
/// target.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub data_root: PathBuf,
    pub zone: LabZone,
    pub daily_water_target_ul: Option<f64>,
    pub config: Option<RigConfig>,
}

impl Ctx {
    /// From `--config` (else `$RIGD_CONFIG`, else /etc/rigd/rig.toml when it
    /// exists) and `--data-root` (which wins over the configuration's).
    pub fn resolve(config: Option<&Path>, data_root: Option<&Path>) -> Result<Ctx, String> {
        let env = std::env::var_os("RIGD_CONFIG").map(PathBuf::from);
        let path = config
            .map(Path::to_path_buf)
            .or(env)
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
        let cfg = match &path {
            Some(p) => Some(rig_config::load(p).map_err(|e| e.to_string())?.config),
            None => None,
        };
        let data_root = match (data_root, &cfg) {
            (Some(d), _) => d.to_path_buf(),
            (None, Some(c)) => c.storage.data_root.clone(),
            (None, None) => {
                return Err(format!(
                    "which data root? give --config RIG.toml (its [storage].data_root and \
                     [lab].timezone), set RIGD_CONFIG, or give --data-root DIR ({DEFAULT_CONFIG} \
                     does not exist)"
                ))
            }
        };
        let zone = match &cfg {
            Some(c) => LabZone::new(&c.lab.timezone)?,
            None => LabZone::utc(),
        };
        Ok(Ctx {
            data_root,
            zone,
            daily_water_target_ul: cfg.as_ref().and_then(|c| c.safety.daily_water_target_ul),
            config: cfg,
        })
    }
}

/// The fields `mouse add` and `mouse edit` take (None: not given).
#[derive(Debug, Clone, Default)]
pub struct SubjectFields {
    pub species: Option<String>,
    pub sex: Option<String>,
    pub date_of_birth: Option<String>,
    pub strain: Option<String>,
    pub genotype: Option<String>,
    pub experimenter: Option<String>,
    pub baseline_weight_g: Option<f64>,
    pub notes: Option<String>,
    pub lab: Option<String>,
    pub institution: Option<String>,
}

/// `rigctl mouse add`: a new record. Species defaults to Mus musculus; sex,
/// date of birth and baseline weight must be given.
pub fn mouse_add(ctx: &Ctx, id: &str, f: SubjectFields) -> Result<PathBuf, String> {
    let missing: Vec<&str> = [
        ("--sex", f.sex.is_none()),
        ("--date-of-birth", f.date_of_birth.is_none()),
        ("--baseline-weight-g", f.baseline_weight_g.is_none()),
    ]
    .iter()
    .filter(|(_, m)| *m)
    .map(|(n, _)| *n)
    .collect();
    if !missing.is_empty() {
        return Err(format!(
            "mouse add {id}: give {} (the record's required fields)",
            missing.join(", ")
        ));
    }
    let s = Subject {
        id: id.to_owned(),
        species: f.species.unwrap_or_else(|| "Mus musculus".into()),
        sex: f.sex.unwrap_or_default(),
        date_of_birth: f.date_of_birth.unwrap_or_default(),
        strain: f.strain.unwrap_or_default(),
        genotype: f.genotype.unwrap_or_default(),
        experimenter: f.experimenter.unwrap_or_default(),
        baseline_weight_g: f.baseline_weight_g.unwrap_or_default(),
        notes: f.notes.unwrap_or_default(),
        lab: f.lab,
        institution: f.institution,
        age: None,
        description: None,
    };
    training::subject::write(&ctx.data_root, &s, true, ctx.zone.today_date())
        .map_err(|e| e.to_string())
}

/// `rigctl mouse edit`: change the given fields of an existing record.
pub fn mouse_edit(ctx: &Ctx, id: &str, f: SubjectFields) -> Result<(PathBuf, Subject), String> {
    let mut s = training::subject::read(&ctx.data_root, id).map_err(|e| e.to_string())?;
    macro_rules! set {
        ($($k:ident),*) => { $( if let Some(v) = f.$k { s.$k = v; } )* };
    }
    set!(
        species,
        sex,
        date_of_birth,
        strain,
        genotype,
        experimenter,
        baseline_weight_g,
        notes
    );
    if f.lab.is_some() {
        s.lab = f.lab;
    }
    if f.institution.is_some() {
        s.institution = f.institution;
    }
    let p = training::subject::write(&ctx.data_root, &s, false, ctx.zone.today_date())
        .map_err(|e| e.to_string())?;
    Ok((p, s))
}

/// `rigctl mouse list`: one line per mouse, with its current stage and
/// training day when a protocol is configured.
pub fn mouse_list(ctx: &Ctx) -> Result<String, String> {
    let all = training::subject::list(&ctx.data_root).map_err(|e| e.to_string())?;
    let mut out = format!(
        "{:<16} {:<3} {:<10} {:>8} {:>4}  {:<16} {}\n",
        "mouse", "sex", "born", "base_g", "days", "last stage", "experimenter"
    );
    for s in all {
        match s {
            Ok(s) => {
                let (rows, _) = training::read_sessions(&ctx.data_root, &s.id, &ctx.zone);
                let last = rows.last();
                out.push_str(&format!(
                    "{:<16} {:<3} {:<10} {:>8.1} {:>4}  {:<16} {}\n",
                    s.id,
                    s.sex,
                    s.date_of_birth,
                    s.baseline_weight_g,
                    last.and_then(|r| r.training.as_ref()).map_or(0, |t| t.day),
                    last.and_then(|r| r.stage()).unwrap_or("-"),
                    s.experimenter
                ));
            }
            Err(e) => out.push_str(&format!("(unreadable) {e}\n")),
        }
    }
    Ok(out)
}

/// A mouse's history: its sessions, the water ledger per lab-local day,
/// and notes on what could not be read.
#[derive(Debug, Clone)]
pub struct History {
    pub rows: Vec<training::SessionRow>,
    pub ledger: std::collections::BTreeMap<String, training::water::DayWater>,
    pub notes: Vec<String>,
}

/// The history rows and the water ledger of a mouse.
pub fn history(ctx: &Ctx, mouse: &str) -> Result<History, String> {
    protocol::control::validate_mouse_id(mouse).map_err(|e| e.to_string())?;
    if !ctx.data_root.join(mouse).is_dir() {
        return Err(format!(
            "no mouse {mouse} in {} (`rigctl mouse list` shows the mice)",
            ctx.data_root.display()
        ));
    }
    let (rows, skipped) = training::read_sessions(&ctx.data_root, mouse, &ctx.zone);
    let (gifts, bad) = training::water::gifts(&ctx.data_root, mouse);
    let ledger = training::water::ledger(&rows, &gifts, ctx.daily_water_target_ul);
    let mut notes: Vec<String> = skipped
        .iter()
        .map(|s| format!("not a session: {}: {}", s.dir.display(), s.reason))
        .collect();
    if bad > 0 {
        notes.push(format!("{bad} line(s) of water.tsv could not be read"));
    }
    Ok(History {
        rows,
        ledger,
        notes,
    })
}

/// Where `rigctl report` writes when `--out` is not given.
pub fn default_report_path(ctx: &Ctx, mouse: &str) -> PathBuf {
    ctx.data_root.join(mouse).join("report.html")
}

/// What the mouse's next session will be: its training day if it ran
/// today, and with a protocol the stage the rules choose and why.
pub fn next_session(ctx: &Ctx, mouse: &str) -> String {
    let (rows, _) = training::read_sessions(&ctx.data_root, mouse, &ctx.zone);
    let day = training::training_day(&rows, &ctx.zone.today());
    let mut out = format!(
        "next session  training day {day} if today ({})",
        ctx.zone.name()
    );
    let protocol = ctx
        .config
        .as_ref()
        .and_then(|c| c.training.as_ref())
        .and_then(|t| t.protocol.as_ref());
    if let Some(path) = protocol {
        match training::Protocol::load(path) {
            Ok(p) => {
                let past = training::history::past_on_protocol(&rows, &p.file.name);
                match training::decide(&p, &past) {
                    Ok(d) => out.push_str(&format!(
                        "\n              stage {} of {} ({})",
                        d.name, p.file.name, d.why
                    )),
                    Err(e) => out.push_str(&format!("\n              stage: {e}")),
                }
            }
            Err(e) => out.push_str(&format!("\n              protocol: {e}")),
        }
    }
    out
}

/// `rigctl mouse reference set`: check the image and, when given, that the
/// label image (and table) fits it as rigd will read them, then make them
/// the mouse's imaging reference.
pub fn reference_set(
    ctx: &Ctx,
    id: &str,
    new: training::reference::NewReference,
) -> Result<training::reference::MouseReference, String> {
    let (w, h) = training::reference::check_image(&new.image).map_err(|e| e.to_string())?;
    if let Some(labels) = &new.roi_labels {
        let rois = crate::imaging::rois::RoiSet::load(
            labels,
            new.roi_table.as_deref(),
            w as usize,
            h as usize,
            &crate::imaging::rois::NeuropilParams::default(),
        )
        .map_err(|e| format!("{e} (the reference image is {w} x {h})"))?;
        if rois.is_empty() {
            return Err(format!(
                "{}: no ROI in the label image (every pixel is 0)",
                labels.display()
            ));
        }
    }
    if let Some(c) = &ctx.config {
        if c.imaging.enabled && (c.imaging.width, c.imaging.height) != (w, h) {
            return Err(format!(
                "{}: the image is {w} x {h} pixels, this rig's frames are {} x {} ([imaging] \
                 width/height): give a mean image from a session at this frame size",
                new.image.display(),
                c.imaging.width,
                c.imaging.height
            ));
        }
    }
    let now = session_format::rfc3339_utc(std::time::SystemTime::now());
    training::reference::set(&ctx.data_root, id, &new, now).map_err(|e| e.to_string())
}

/// The reference record, for people.
pub fn reference_text(r: &training::reference::MouseReference) -> String {
    let rec = &r.record;
    let mut out = format!(
        "imaging reference    {}\nset                  {}{}\nsource               {}\nsize                 {} x {} px\n",
        r.image.display(),
        rec.set_utc,
        rec.operator
            .as_deref()
            .map(|o| format!(" by {o}"))
            .unwrap_or_default(),
        rec.from_session.as_deref().unwrap_or(&rec.source),
        rec.width,
        rec.height
    );
    match &r.roi_labels {
        Some(l) => out += &format!("roi labels           {}\n", l.display()),
        None => out += "roi labels           none (the rig's [imaging].roi_labels, if any)\n",
    }
    if let Some(t) = &r.roi_table {
        out += &format!("roi table            {}\n", t.display());
    }
    if let Some(n) = &rec.note {
        out += &format!("note                 {n}\n");
    }
    if let Some(p) = &rec.previous_set_utc {
        out += &format!(
            "replaces             the reference set {p} from {}\n",
            rec.previous_source.as_deref().unwrap_or("?")
        );
    }
    out
}
