//! Static sharding: `fanout batch --shard K/N` runs every N-th row of the input
//! (rows K, K+N, K+2N, … counting from 1), with no coordinator at all — what an
//! array job (a Slurm array, a Kubernetes Indexed Job) needs — and
//! `fanout jobs merge` puts the shards back together in input order.
//!
//! A shard is a job of its own over its rows: its store numbers them 0, 1, 2, …
//! in the order they come, so everything that runs a job (resuming, the
//! committer's ordered output, the Batch API) works on a shard unchanged, and
//! row `i` of a shard is row `i × N + K − 1` of the input. Row ids and line
//! numbers stay those of the input, so errors name the input's lines.

use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{Context, Result, anyhow};
use fanout_store::{Fingerprint, Job, Record, Store};

use crate::Refusal;
use crate::batch::Spec;
use crate::fingerprint::SHARD_PART;
use crate::input::Row;
use crate::output::OutputFormat;

/// Shard `number` of `count` (`3/8`): the rows whose index is `number − 1`
/// modulo `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Shard {
    /// From 1 to `count`.
    number: u64,
    count: u64,
}

impl Shard {
    pub fn new(number: u64, count: u64) -> Result<Self, String> {
        if count == 0 {
            return Err("a job splits into at least 1 shard (N in K/N)".into());
        }
        if number == 0 || number > count {
            return Err(format!("shard {number}/{count}: K counts from 1 to {count}"));
        }
        Ok(Self { number, count })
    }

    /// Whether the input's row `index` (from 0) is this shard's.
    pub fn takes(self, index: u64) -> bool {
        index % self.count == self.number - 1
    }

    /// The input's row `index` as this shard numbers it.
    fn local(self, index: u64) -> u64 {
        index / self.count
    }

    /// This shard's row `local` as the input numbers it.
    fn global(self, local: u64) -> u64 {
        local * self.count + self.number - 1
    }

    /// How many of the input's first `rows` rows are this shard's.
    pub fn rows_of(self, rows: u64) -> u64 {
        (rows + self.count - self.number) / self.count
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.number, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let malformed = || format!("`{text}` is not a shard: expected K/N, e.g. 3/8");
        let (number, count) = text.trim().split_once('/').ok_or_else(malformed)?;
        let number = number.trim().parse().map_err(|_| malformed())?;
        let count = count.trim().parse().map_err(|_| malformed())?;
        Self::new(number, count)
    }
}

impl TryFrom<String> for Shard {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl From<Shard> for String {
    fn from(shard: Shard) -> String {
        shard.to_string()
    }
}

/// The input's rows that `shard` takes, numbered as the shard numbers them;
/// every row without one.
pub fn rows(
    shard: Option<Shard>,
    rows: impl Iterator<Item = Row> + Send + 'static,
) -> Box<dyn Iterator<Item = Row> + Send> {
    let Some(shard) = shard else { return Box::new(rows) };
    Box::new(rows.filter(move |row| shard.takes(row.index)).map(move |mut row| {
        row.index = shard.local(row.index);
        row
    }))
}

/// `fanout jobs merge`'s arguments.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The shards: their job stores (each shard's `--store`), or their output
    /// files (JSONL or CSV, every shard's, given in order 1/N, 2/N, …)
    #[arg(required = true)]
    sources: Vec<PathBuf>,
    /// The shards' job in each store [default: the store's shards, whatever their names]
    #[arg(long)]
    job: Option<String>,
    /// The merged job's name in --store [default: the shards' job name]
    #[arg(long)]
    into: Option<String>,
    /// Also write the merged results, in input order, to this file (from
    /// output files: where they go [default: stdout])
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// [default: the job's]
    #[arg(long, value_enum)]
    output_format: Option<OutputFormat>,
}

/// What SQLite writes first in every database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

fn is_store(path: &Path) -> Result<bool> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut head = [0u8; 16];
    let read = file.read(&mut head).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(read == head.len() && &head == SQLITE_MAGIC)
}

pub fn merge(store: &Path, args: MergeArgs, quiet: bool) -> Result<ExitCode> {
    let mut stores = Vec::new();
    for source in &args.sources {
        stores.push(is_store(source).map_err(Refusal)?);
    }
    if stores.iter().all(|store| *store) {
        merge_stores(store, &args, quiet)
    } else if stores.iter().all(|store| !*store) {
        if args.job.is_some() || args.into.is_some() {
            let why = "--job and --into name jobs in stores; these are output files";
            return Err(Refusal(anyhow!(why)).into());
        }
        merge_outputs(&args.sources, args.output.as_deref(), args.output_format)
    } else {
        let why = "give either the shards' stores or their output files, not some of each";
        Err(Refusal(anyhow!(why)).into())
    }
}

/// One shard's job, found in a source store.
struct ShardJob {
    source: PathBuf,
    store: Store,
    job: Job,
    spec: Spec,
    shard: Shard,
}

impl ShardJob {
    /// The fingerprint of the whole job the shard is part of.
    fn whole(&self) -> Fingerprint {
        let mut parts = self.job.fingerprint.0.clone();
        parts.remove(SHARD_PART);
        Fingerprint(parts)
    }

    fn named(&self) -> String {
        format!("job `{}` in {} (shard {})", self.job.name, self.source.display(), self.shard)
    }
}

/// The shards a store holds: the job named `name`, or without one every
/// sharded batch job in it.
fn shards_in(source: &Path, name: Option<&str>) -> Result<Vec<ShardJob>> {
    let store = Store::open(source)?;
    let jobs = match name {
        Some(name) => vec![
            store
                .job(name)?
                .ok_or_else(|| Refusal(anyhow!("{} holds no job `{name}`", source.display())))?,
        ],
        None => store.jobs()?.into_iter().map(|summary| summary.job).collect(),
    };
    let mut shards = Vec::new();
    for job in jobs {
        let spec = serde_json::from_value::<Spec>(job.settings.clone()).ok();
        let Some((spec, shard)) = spec.and_then(|spec| Some((spec.clone(), spec.shard?))) else {
            if name.is_some() {
                let why = format!(
                    "job `{}` in {} is not a shard: it was not run with `batch --shard K/N`",
                    job.name,
                    source.display()
                );
                return Err(Refusal(anyhow!(why)).into());
            }
            continue;
        };
        // Each shard reads its records through a connection of its own.
        let store = Store::open(source)?;
        shards.push(ShardJob { source: source.to_path_buf(), store, job, spec, shard });
    }
    if shards.is_empty() {
        let why =
            format!("{} holds no shard of a job (`fanout batch --shard K/N`)", source.display());
        return Err(Refusal(anyhow!(why)).into());
    }
    Ok(shards)
}

/// Checks that the shards are parts of one job, each once; says which are
/// missing (their rows are left for `jobs resume`).
fn check_shards(shards: &mut [ShardJob]) -> Result<Vec<Shard>> {
    shards.sort_by_key(|shard| shard.shard.number);
    let first = &shards[0];
    let (count, whole) = (first.shard.count, first.whole());
    for other in &shards[1..] {
        if other.shard.count != count {
            let why =
                format!("{} and {} split the input differently", first.named(), other.named());
            return Err(Refusal(anyhow!(why)).into());
        }
        let changed = whole.differences(&other.whole());
        if !changed.is_empty() {
            let why = format!(
                "{} and {} are not parts of one job: their {} differ",
                first.named(),
                other.named(),
                changed.join(", ")
            );
            return Err(Refusal(anyhow!(why)).into());
        }
    }
    for pair in shards.windows(2) {
        if pair[0].shard == pair[1].shard {
            let why = format!(
                "shard {} is given twice: {} and {}",
                pair[0].shard,
                pair[0].named(),
                pair[1].named()
            );
            return Err(Refusal(anyhow!(why)).into());
        }
    }
    let missing = (1..=count)
        .filter(|number| shards.iter().all(|shard| shard.shard.number != *number))
        .map(|number| Shard { number, count })
        .collect();
    Ok(missing)
}

/// Refuses a shard with rows still at a provider's Batch API: the merged job
/// knows nothing of its batches, and resuming it would send (and pay for)
/// those rows a second time.
fn check_no_open_batch(shard: &ShardJob) -> Result<()> {
    use fanout_store::remote_state::{ABANDONED, CANCELLED};
    let finished = shard.store.finished(shard.job.id, true)?;
    for batch in shard.store.remote_batches(shard.job.id)? {
        if batch.state == ABANDONED || batch.state == CANCELLED {
            continue;
        }
        let rows = shard.store.remote_rows(batch.id)?;
        if rows.iter().any(|row| !finished.contains(*row)) {
            let why = format!(
                "{} has rows still at the Batch API: finish the shard first \
                 (`fanout --store {} jobs resume {}`), so that no row is paid for twice",
                shard.named(),
                shard.source.display(),
                shard.job.name
            );
            return Err(Refusal(anyhow!(why)).into());
        }
    }
    Ok(())
}

/// The most records copied in one transaction.
const COPY_GROUP: usize = 4096;

/// The shards' jobs become one job over the whole input in `target`: each
/// record at its input row, the rest (unfinished rows, missing shards) left
/// for `fanout jobs resume`.
fn merge_stores(target: &Path, args: &MergeArgs, quiet: bool) -> Result<ExitCode> {
    let mut shards = Vec::new();
    for source in &args.sources {
        shards.extend(shards_in(source, args.job.as_deref())?);
    }
    let missing = check_shards(&mut shards)?;
    for shard in &shards {
        check_no_open_batch(shard)?;
    }
    let name = match &args.into {
        Some(name) => name.clone(),
        None if shards.iter().all(|shard| shard.job.name == shards[0].job.name) => {
            shards[0].job.name.clone()
        }
        None => {
            let why = "the shards' jobs have different names: name the merged job with --into NAME";
            return Err(Refusal(anyhow!(why)).into());
        }
    };
    let mut store = Store::open(target)?;
    if store.job(&name)?.is_some() {
        let why = format!(
            "{} already holds a job `{name}`: merge into another store (--store) or name the merged job (--into)",
            target.display()
        );
        return Err(Refusal(anyhow!(why)).into());
    }
    let first = &shards[0];
    let spec = Spec { shard: None, ..first.spec.clone() };
    let settings = serde_json::to_value(&spec).expect("the spec serializes");
    let job = store.create_job(&name, &first.job.input, &first.whole(), &settings)?;
    let copied = match copy_records(&shards, &mut store, job.id) {
        Ok(copied) => copied,
        Err(error) => {
            // Half a merge is no job: the next merge starts afresh.
            store.remove_job(&name)?;
            return Err(error);
        }
    };
    // The input's rows: every shard's count, when each run has counted them.
    let totals: Option<Vec<u64>> = shards.iter().map(|shard| shard.job.total).collect();
    if let (true, Some(totals)) = (missing.is_empty(), totals) {
        store.set_total(job.id, totals.iter().sum())?;
    }
    if !quiet {
        eprintln!(
            "fanout: merged {} shards ({copied} results) into job `{name}` in {}",
            shards.len(),
            target.display()
        );
    }
    if !missing.is_empty() {
        let missing: Vec<String> = missing.iter().map(Shard::to_string).collect();
        eprintln!(
            "fanout: shard{} {} missing: {} rows are left for `fanout jobs resume {name}`",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            if missing.len() == 1 { "its" } else { "their" },
        );
    }
    if let Some(output) = &args.output {
        crate::jobs::export(target, &name, Some(output), args.output_format)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Copies every shard's records into `job`, each at its input row; returns
/// how many.
fn copy_records(shards: &[ShardJob], store: &mut Store, job: i64) -> Result<u64> {
    let mut copied = 0u64;
    for shard in shards {
        let mut group: Vec<Record> = Vec::with_capacity(COPY_GROUP);
        shard.store.each_record(shard.job.id, |mut record| -> Result<()> {
            record.index = shard.shard.global(record.index);
            group.push(record);
            if group.len() == COPY_GROUP {
                store.record(job, &group)?;
                copied += group.len() as u64;
                group.clear();
            }
            Ok(())
        })?;
        store.record(job, &group)?;
        copied += group.len() as u64;
    }
    Ok(copied)
}

/// One shard's output file, read one result at a time.
enum ShardOutput {
    Lines(std::io::Lines<BufReader<File>>),
    Csv(csv::ByteRecordsIntoIter<File>),
}

/// Where the merged results go.
enum MergedOutput {
    Lines(Box<dyn Write>),
    /// Boxed: the writer carries its own buffer.
    Csv(Box<csv::Writer<Box<dyn Write>>>),
}

impl MergedOutput {
    /// Copies the next result of `from` here; `false` when it has none.
    fn copy_next(&mut self, from: &mut ShardOutput) -> Result<bool> {
        match (self, from) {
            (Self::Lines(sink), ShardOutput::Lines(lines)) => {
                let Some(line) = lines.next().transpose()? else { return Ok(false) };
                writeln!(sink, "{line}")?;
            }
            (Self::Csv(writer), ShardOutput::Csv(records)) => {
                let Some(record) = records.next().transpose()? else { return Ok(false) };
                writer.write_byte_record(&record)?;
            }
            _ => unreachable!("one format for every shard"),
        }
        Ok(true)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Lines(sink) => sink.flush(),
            Self::Csv(writer) => writer.flush(),
        }
    }
}

/// The shards' output files, interleaved back into input order: the merged
/// row `i` is row `i / N` of shard `i mod N + 1`. Only the order they are
/// given in tells which shard a file is, so counts that no round-robin split
/// has (a shard with more results than the one before it, or two fewer than
/// the first) are refused.
fn merge_outputs(
    sources: &[PathBuf],
    output: Option<&Path>,
    format: Option<OutputFormat>,
) -> Result<ExitCode> {
    let csv = match format {
        Some(format) => format == OutputFormat::Csv,
        None => sources
            .iter()
            .all(|source| source.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"))),
    };
    if let Some(output) = output
        && let Some(source) = sources.iter().find(|source| same_file(source, output))
    {
        let why =
            format!("{} is one of the shards: write the merge elsewhere (-o)", source.display());
        return Err(Refusal(anyhow!(why)).into());
    }
    let counts = sources.iter().map(|s| count_results(s, csv)).collect::<Result<Vec<_>>>()?;
    let first = counts[0];
    if let Some(i) = counts.windows(2).position(|pair| pair[1] > pair[0] || pair[1] + 1 < first) {
        let why = format!(
            "{} has {} results and {} has {}: these are not the outputs of shards 1/{n} to {n}/{n} \
             in that order (give them in shard order, each shard finished: `fanout jobs resume` finishes one)",
            sources[i].display(),
            counts[i],
            sources[i + 1].display(),
            counts[i + 1],
            n = sources.len()
        );
        return Err(Refusal(anyhow!(why)).into());
    }
    let sink: Box<dyn Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let mut merged = if csv {
        MergedOutput::Csv(Box::new(csv::Writer::from_writer(sink)))
    } else {
        MergedOutput::Lines(sink)
    };
    let mut shards = Vec::new();
    let mut header: Option<csv::ByteRecord> = None;
    for source in sources {
        let file =
            File::open(source).with_context(|| format!("cannot open {}", source.display()))?;
        if !csv {
            shards.push(ShardOutput::Lines(BufReader::new(file).lines()));
            continue;
        }
        let mut reader = csv::Reader::from_reader(file);
        let columns = reader
            .byte_headers()
            .with_context(|| format!("cannot read {}", source.display()))?
            .clone();
        match (&header, &mut merged) {
            (Some(first), _) if *first != columns => {
                let why =
                    format!("{} has other columns than {}", source.display(), sources[0].display());
                return Err(Refusal(anyhow!(why)).into());
            }
            (Some(_), _) => {}
            (None, MergedOutput::Csv(writer)) => {
                writer.write_byte_record(&columns)?;
                header = Some(columns);
            }
            (None, MergedOutput::Lines(_)) => unreachable!("CSV merges into CSV"),
        }
        shards.push(ShardOutput::Csv(reader.into_byte_records()));
    }
    let total: u64 = counts.iter().sum();
    for i in 0..total {
        let shard = (i % shards.len() as u64) as usize;
        if !merged.copy_next(&mut shards[shard])? {
            let why = format!("{} changed while it was merged", sources[shard].display());
            return Err(anyhow!(why));
        }
    }
    merged.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Whether `a` and `b` name one file (`b` may not exist yet).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The results in one shard's output file.
fn count_results(path: &Path, csv: bool) -> Result<u64> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let context = || format!("cannot read {}", path.display());
    if csv {
        let mut count = 0;
        for record in csv::Reader::from_reader(file).into_byte_records() {
            record.with_context(context)?;
            count += 1;
        }
        return Ok(count);
    }
    let mut count = 0;
    for line in BufReader::new(file).lines() {
        line.with_context(context)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn shards_take_every_row_once_and_number_them_back() {
        for count in 1..=7u64 {
            let shards: Vec<Shard> = (1..=count).map(|k| Shard::new(k, count).unwrap()).collect();
            for rows in 0..30u64 {
                let counted: u64 = shards.iter().map(|s| s.rows_of(rows)).sum();
                assert_eq!(counted, rows, "{count} shards of {rows} rows");
                for index in 0..rows {
                    let takers: Vec<&Shard> = shards.iter().filter(|s| s.takes(index)).collect();
                    assert_eq!(takers.len(), 1, "row {index} of {count} shards");
                    assert_eq!(takers[0].global(takers[0].local(index)), index);
                }
                for shard in &shards {
                    let taken = (0..rows).filter(|i| shard.takes(*i)).count() as u64;
                    assert_eq!(shard.rows_of(rows), taken, "shard {shard} of {rows} rows");
                }
            }
        }
    }

    #[test]
    fn a_shard_reads_as_k_of_n_and_refuses_what_is_not_one() {
        assert_eq!("3/8".parse::<Shard>(), Ok(Shard { number: 3, count: 8 }));
        assert_eq!(Shard::new(8, 8).unwrap().to_string(), "8/8");
        let refused = |text: &str| text.parse::<Shard>().unwrap_err();
        assert!(refused("0/8").contains("K counts from 1 to 8"), "{}", refused("0/8"));
        assert!(refused("9/8").contains("K counts from 1 to 8"));
        assert!(refused("1/0").contains("at least 1 shard"));
        assert!(refused("3").contains("expected K/N"));
        assert!(refused("a/b").contains("expected K/N"));
        let stored: Shard = serde_json::from_value(serde_json::json!("2/4")).unwrap();
        assert_eq!(serde_json::to_value(stored).unwrap(), "2/4");
    }
}
