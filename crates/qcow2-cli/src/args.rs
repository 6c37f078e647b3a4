//! The command line, declared with clap: one struct per subcommand, typed
//! values where qemu-img takes a fixed set, and qemu-img's option letters.
//! Every option declared here is honoured by its command; anything else is
//! refused by the parser with a message naming it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::image_options::OptionList;
use crate::size::{parse_size, SizeChange};

/// qcow2 images with inline deduplication, with qemu-img's habits.
#[derive(Debug, Parser)]
#[command(
    name = "qcow2",
    version,
    about,
    after_help = "Sizes are bytes, or take a suffix of powers of 1024: k or K, M, G, T, P, E \
                  (with an optional B or iB: 64k, 1.5G, 10GiB)."
)]
pub struct Cli {
    /// Secrets and image option lists, on every subcommand.
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// `--object secret,...` and `--image-opts`, as qemu-img takes them.
#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// Define a secret: `secret,id=ID,data=PASSPHRASE` or
    /// `secret,id=ID,file=PATH` (repeatable).
    #[arg(long = "object", value_name = "OBJECTDEF", global = true)]
    pub objects: Vec<String>,
    /// Image arguments are option lists:
    /// `driver=qcow2,file.filename=PATH,encrypt.key-secret=ID`.
    #[arg(long = "image-opts", global = true)]
    pub image_opts: bool,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new qcow2 image.
    Create(CreateArgs),
    /// Show facts about an image.
    Info(InfoArgs),
    /// Check an image's consistency, optionally repairing it.
    Check(CheckArgs),
    /// Convert an image to raw or qcow2 (optionally deduplicated).
    Convert(ConvertArgs),
    /// Deduplicate a qcow2 image in place, or into a new image.
    Dedup(DedupArgs),
    /// Show how each range of the virtual disk is stored.
    Map(MapArgs),
    /// Compare the contents of two images.
    Compare(CompareArgs),
    /// Time a stream of reads or writes, as `qemu-img bench` does.
    Bench(BenchArgs),
    /// Serve an image over NBD, as `qemu-nbd` does (deduplicating inline).
    Serve(ServeArgs),
    /// Grow or (with --shrink) shrink an image's virtual disk.
    Resize(ResizeArgs),
    /// List, create, apply and delete internal snapshots.
    Snapshot(SnapshotArgs),
    /// Add, remove, clear, enable, disable and merge persistent dirty bitmaps.
    Bitmap(BitmapArgs),
    /// Move an overlay onto another backing file.
    Rebase(RebaseArgs),
    /// Write an overlay's data into its backing file.
    Commit(CommitArgs),
    /// Compute the size of an image converted from a source, or created.
    Measure(MeasureArgs),
    /// Change an image's options in place (compat, lazy_refcounts, refcount_bits, dedup).
    Amend(AmendArgs),
}

/// `qcow2 rebase [-f qcow2] [-u] [-p] [-q] -b BACKING [-F FMT] FILE`
#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// `-f qcow2`.
    #[command(flatten)]
    pub format: Qcow2Format,
    /// Only change the backing file name ("unsafe"): no data is compared or
    /// copied.
    #[arg(short = 'u')]
    pub unsafe_: bool,
    /// The new backing file; an empty name removes the backing file (its
    /// data is copied in first unless -u).
    #[arg(short = 'b', value_name = "BACKING", required = true)]
    pub backing: String,
    /// Format of the new backing file (probed when not given).
    #[arg(short = 'F', value_enum)]
    pub backing_format: Option<ImageFormat>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// The overlay to rebase.
    pub file: PathBuf,
}

/// `qcow2 commit [-f qcow2] [-b BASE] [-d] [-p] [-q] FILE`
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// `-f qcow2`.
    #[command(flatten)]
    pub format: Qcow2Format,
    /// The image of FILE's backing chain to commit into (default: its
    /// backing file). The images between are left stale, so -b implies -d.
    #[arg(short = 'b', value_name = "BASE")]
    pub base: Option<PathBuf>,
    /// Keep FILE's data after committing it (do not empty it).
    #[arg(short = 'd')]
    pub keep: bool,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// The overlay to commit.
    pub file: PathBuf,
}

/// `qcow2 amend [-f qcow2] [-q] -o OPTIONS FILE`
#[derive(Debug, Args)]
pub struct AmendArgs {
    /// `-f qcow2`.
    #[command(flatten)]
    pub format: Qcow2Format,
    /// Options to change: `compat=0.10|1.1`, `lazy_refcounts=on|off`,
    /// `refcount_bits=N` (rebuilds the refcount structure), `size=SIZE`
    /// (grows or shrinks), `data_file=NAME` (renames an external data
    /// file), `data_file_raw=off`, and `dedup=on`
    /// (builds the dedup table from the data) or `dedup=off` (drops it, so
    /// QEMU can write the image); or, alone, LUKS key slots:
    /// `encrypt.state=active,encrypt.new-secret=ID[,encrypt.keyslot=N]
    /// [,encrypt.iter-time=MS]` or `encrypt.state=inactive` with
    /// `encrypt.keyslot=N` or `encrypt.old-secret=ID`. The whole list is
    /// checked before the first change; any other key is refused.
    #[arg(short = 'o', action = clap::ArgAction::Append, value_name = "OPTIONS", required = true)]
    pub option_lists: Vec<OptionList>,
    /// Allow erasing every active LUKS key slot (the data becomes
    /// unreadable for ever), as qemu-img's --force.
    #[arg(long)]
    pub force: bool,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// The image.
    pub file: PathBuf,
}

/// `qcow2 snapshot -l IMAGE`
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("action").required(true).multiple(false))]
pub struct SnapshotArgs {
    /// List the snapshots, as qemu-img does.
    #[arg(short = 'l', group = "action")]
    pub list: bool,
    /// Create a snapshot of the disk as it is now.
    #[arg(short = 'c', value_name = "NAME", group = "action")]
    pub create: Option<String>,
    /// Revert the disk to a snapshot (by ID, or else by name, as qemu-img).
    #[arg(short = 'a', value_name = "NAME", group = "action")]
    pub apply: Option<String>,
    /// Delete the snapshot with this name (by name only, as qemu-img).
    #[arg(short = 'd', value_name = "NAME", group = "action")]
    pub delete: Option<String>,
    /// The image.
    pub image: PathBuf,
}

/// `qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | --enable |
/// --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [-f
/// qcow2] FILE BITMAP`: the operations run in the order given, as in
/// qemu-img.
#[derive(Debug, Args)]
pub struct BitmapArgs {
    /// The operations, in command-line order.
    #[command(flatten)]
    pub operations: BitmapOperations,
    /// Bytes one bit covers, for --add (a power of two, 512 to 2G; by
    /// default the cluster size within 4k..64k).
    #[arg(short = 'g', value_name = "GRANULARITY", value_parser = parse_size)]
    pub granularity: Option<u64>,
    /// The image holding the --merge source bitmaps (by default FILE).
    #[arg(short = 'b', value_name = "SOURCE_FILE")]
    pub source_file: Option<PathBuf>,
    /// Format of SOURCE_FILE (only qcow2 holds bitmaps).
    #[arg(
        short = 'F',
        value_name = "SOURCE_FMT",
        value_enum,
        requires = "source_file"
    )]
    pub source_format: Option<Qcow2Only>,
    /// `-f qcow2`.
    #[command(flatten)]
    pub format: Qcow2Format,
    /// The image.
    pub file: PathBuf,
    /// The bitmap the operations change.
    pub bitmap: String,
}

/// One `qcow2 bitmap` operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapOperation {
    /// `--add`: a new, enabled, empty bitmap.
    Add,
    /// `--remove`.
    Remove,
    /// `--clear`: every bit cleared.
    Clear,
    /// `--enable`.
    Enable,
    /// `--disable`.
    Disable,
    /// `--merge SOURCE`: the bits of bitmap SOURCE set in this one.
    Merge(String),
}

/// The operations of `qcow2 bitmap` in command-line order (clap's derive
/// keeps each flag's values apart; this puts them back in order by their
/// positions on the command line).
#[derive(Debug, Clone, Default)]
pub struct BitmapOperations(pub Vec<BitmapOperation>);

const BITMAP_FLAGS: [(&str, &str); 5] = [
    ("add", "Create BITMAP, enabled to record later writes"),
    ("remove", "Remove BITMAP"),
    ("clear", "Clear every bit of BITMAP"),
    ("enable", "Enable BITMAP: later writes set its bits"),
    ("disable", "Disable BITMAP: its bits stay as they are"),
];

impl clap::FromArgMatches for BitmapOperations {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut ops: Vec<(usize, BitmapOperation)> = Vec::new();
        for (id, _) in BITMAP_FLAGS {
            let op = match id {
                "add" => BitmapOperation::Add,
                "remove" => BitmapOperation::Remove,
                "clear" => BitmapOperation::Clear,
                "enable" => BitmapOperation::Enable,
                _ => BitmapOperation::Disable,
            };
            for index in matches.indices_of(id).into_iter().flatten() {
                ops.push((index, op.clone()));
            }
        }
        if let (Some(indices), Some(values)) = (
            matches.indices_of("merge"),
            matches.get_many::<String>("merge"),
        ) {
            for (index, source) in indices.zip(values) {
                ops.push((index, BitmapOperation::Merge(source.clone())));
            }
        }
        ops.sort_by_key(|(index, _)| *index);
        Ok(Self(ops.into_iter().map(|(_, op)| op).collect()))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for BitmapOperations {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = cmd.group(
            clap::ArgGroup::new("operation")
                .multiple(true)
                .required(true),
        );
        for (id, help) in BITMAP_FLAGS {
            cmd = cmd.arg(
                clap::Arg::new(id)
                    .long(id)
                    .help(help)
                    .action(clap::ArgAction::Append)
                    .num_args(0)
                    .value_parser(clap::value_parser!(bool))
                    .default_missing_value("true")
                    .group("operation"),
            );
        }
        cmd.arg(
            clap::Arg::new("merge")
                .long("merge")
                .value_name("SOURCE")
                .help("Set in BITMAP every bit set in bitmap SOURCE (of -b SOURCE_FILE, or FILE)")
                .action(clap::ArgAction::Append)
                .group("operation"),
        )
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// `qcow2 resize [-f qcow2] [-q] [--shrink] [--preallocation=MODE] FILE [+|-]SIZE`
#[derive(Debug, Args)]
pub struct ResizeArgs {
    /// `-f qcow2`.
    #[command(flatten)]
    pub format: Qcow2Format,
    /// Allow a smaller size (asked for explicitly, as qemu-img asks).
    #[arg(long)]
    pub shrink: bool,
    /// Allocate the new part of the disk: `off` (default), `metadata`
    /// (clusters mapped, file sparse), `falloc` (blocks reserved) or
    /// `full` (zeros written); growing only, as in qemu-img (given twice,
    /// the last counts, as in qemu-img).
    #[arg(
        long,
        value_name = "MODE",
        value_parser = crate::image_options::parse_preallocation,
        overrides_with = "preallocation"
    )]
    pub preallocation: Option<qcow2_io::Preallocation>,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// The image.
    pub file: PathBuf,
    /// The new size, or `+SIZE` / `-SIZE` relative to the current one.
    #[arg(allow_hyphen_values = true)]
    pub size: SizeChange,
}

/// `-f qcow2`, on the commands that handle qcow2 images only: the one
/// value accepted, for scripts written for qemu-img.
#[derive(Debug, Clone, Copy, Args)]
pub struct Qcow2Format {
    /// Image format (only qcow2).
    #[arg(short = 'f', id = "format", value_name = "FORMAT", value_enum)]
    pub value: Option<Qcow2Only>,
}

/// `-f FMT`, on the commands that read raw or qcow2 images: the format,
/// probed from the content when not given.
#[derive(Debug, Clone, Copy, Args)]
pub struct SourceFormat {
    /// Image format (probed from the content when not given).
    #[arg(short = 'f', id = "format", value_name = "FORMAT", value_enum)]
    pub value: Option<ImageFormat>,
}

/// `-U` / `--force-share`, on every command that only reads an image.
#[derive(Debug, Clone, Copy, Args)]
pub struct ForceShare {
    /// Open the image even while another process writes it, as
    /// qemu-img's -U does (what is read may be changing).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

/// `--output human|json`, on every command that reports.
#[derive(Debug, Clone, Copy, Args)]
pub struct Output {
    /// Output format.
    #[arg(
        id = "output",
        long = "output",
        value_name = "OUTPUT",
        value_enum,
        default_value = "human"
    )]
    pub format: OutputFormat,
}

/// `-q`, on every command that prints on success.
#[derive(Debug, Clone, Copy, Args)]
pub struct Quiet {
    /// Print nothing on success (errors still go to stderr).
    #[arg(short = 'q')]
    pub quiet: bool,
}

/// `--output human|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    #[default]
    Human,
    /// JSON with qemu-img's keys, in qemu-img's order.
    Json,
}

/// An image format this tool reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    /// A plain disk image.
    Raw,
    /// QEMU copy-on-write version 2 (compat 0.10 and 1.1).
    Qcow2,
}

impl ImageFormat {
    /// The name qemu-img and image headers use.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// `-f qcow2`, for commands that only handle qcow2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Qcow2Only {
    /// QEMU copy-on-write version 2.
    Qcow2,
}

/// `check -r`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    /// Reclaim leaked clusters.
    Leaks,
    /// Fix leaks, refcount errors and OFLAG_COPIED, rebuild a dedup table.
    All,
}

/// `convert -T`: how the page cache is used for the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SourceCache {
    /// Bypass the page cache (O_DIRECT for aligned requests).
    None,
    /// Through the page cache (its readahead helps sequential reads).
    Writeback,
}

/// `convert -t`: how the page cache is used for the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheMode {
    /// Bypass the page cache (O_DIRECT for aligned requests); the target is
    /// synced when the job ends.
    None,
    /// Through the page cache; the target is synced when the job ends.
    Writeback,
    /// Through the page cache and never synced (fastest; a crash loses it).
    Unsafe,
}

/// `qcow2 create [-f qcow2] [-o OPTIONS] [-q] FILE [SIZE]`
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format (only qcow2 is created).
    #[arg(short = 'f', value_enum, default_value = "qcow2")]
    pub format: Qcow2Only,
    /// cluster_size=N,refcount_bits=N,compat=0.10|1.1,lazy_refcounts=on|off,dedup=on|off,size=N
    #[arg(short = 'o', action = clap::ArgAction::Append, value_name = "OPTIONS")]
    pub option_lists: Vec<OptionList>,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// Backing file: the new image is an overlay reading through it
    /// (a relative name is resolved against the new image's directory).
    #[arg(short = 'b', long = "backing", value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the backing file (required with -b, as qemu-img requires).
    #[arg(short = 'F', long = "backing-format", value_enum, requires = "backing")]
    pub backing_format: Option<ImageFormat>,
    /// The image file (an existing file is replaced, as qemu-img does).
    pub file: PathBuf,
    /// Virtual size (or `-o size=`; with -b, the backing file's by default).
    #[arg(allow_hyphen_values = true, value_parser = parse_size)]
    pub size: Option<u64>,
}

/// `qcow2 info [-f FMT] [--output human|json] FILE`
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// `-U`.
    #[command(flatten)]
    pub share: ForceShare,
    /// `-f FMT`.
    #[command(flatten)]
    pub format: SourceFormat,
    /// `--output`.
    #[command(flatten)]
    pub output: Output,
    /// Show every image of the backing chain, top first.
    #[arg(long = "backing-chain")]
    pub backing_chain: bool,
    /// The image.
    pub file: PathBuf,
}

/// `qcow2 check [-f qcow2] [-q] [--output human|json] [-r leaks|all] FILE`
///
/// Exit status as qemu-img: 0 clean, 2 corruptions, 3 leaks only, 1 when
/// the check could not run.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// `-U`.
    #[command(flatten)]
    pub share: ForceShare,
    /// `-f qcow2`.
    #[command(flatten)]
    pub format: Qcow2Format,
    /// `--output`.
    #[command(flatten)]
    pub output: Output,
    /// Repair what is found.
    #[arg(short = 'r', value_enum)]
    pub repair: Option<RepairArg>,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// The image.
    pub file: PathBuf,
}

/// `qcow2 convert [-f FMT] [-O FMT] [-o OPTIONS] [-n] [-t CACHE] [-T CACHE] [-p] [-q] SRC DST`
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// `-U`.
    #[command(flatten)]
    pub share: ForceShare,
    /// Source format (probed when not given).
    #[arg(short = 'f', value_enum)]
    pub source_format: Option<ImageFormat>,
    /// Target format.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    pub target_format: ImageFormat,
    /// Creation options of a qcow2 target (as for `create`).
    #[arg(short = 'o', action = clap::ArgAction::Append, value_name = "OPTIONS")]
    pub option_lists: Vec<OptionList>,
    /// The target exists already: write into it instead of creating it.
    #[arg(short = 'n')]
    pub no_create: bool,
    /// Compress the target's clusters (qcow2 only; the compression type is
    /// `-o compression_type=zlib|zstd`).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Cache mode of the target.
    #[arg(short = 't', value_enum, default_value = "none")]
    pub target_cache: CacheMode,
    /// Cache mode of the source.
    #[arg(short = 'T', value_enum, default_value = "writeback")]
    pub source_cache: SourceCache,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// Create the target as an overlay of this backing file, writing only
    /// what the source's top image holds (the backing file is assumed to
    /// hold what the source's backing chain holds, as qemu-img assumes).
    #[arg(short = 'B', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the backing file given with -B (probed when not given).
    #[arg(short = 'F', value_enum, requires = "backing")]
    pub backing_format: Option<ImageFormat>,
    /// Read the source as it was at this internal snapshot (ID or name;
    /// `snapshot.id=ID` and `snapshot.name=NAME` as qemu-img takes them).
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// Also copy the source's persistent bitmaps (qcow2 to qcow2), each
    /// with its name, granularity, enabled state and bits.
    #[arg(long)]
    pub bitmaps: bool,
    /// With --bitmaps: skip inconsistent bitmaps (with a warning) instead
    /// of refusing to convert.
    #[arg(long = "skip-broken-bitmaps")]
    pub skip_broken_bitmaps: bool,
    /// Allow out-of-order writes (`-W`): accepted as qemu-img takes it;
    /// our writer threads already write in whatever order they finish.
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Most requests in flight at once (`-m`, 1 to 16, as qemu-img's
    /// coroutines): the copy uses at most this many threads.
    #[arg(short = 'm', value_name = "COROUTINES")]
    pub parallel: Option<u64>,
    /// With -n: the target reads as zeros already, so runs of zeros in the
    /// source are skipped rather than written.
    #[arg(long = "target-is-zero")]
    pub target_is_zero: bool,
    /// qemu-img's sparse-detection size (`-S`): refused (zeros are found
    /// per cluster of the target).
    #[arg(short = 'S', value_name = "SIZE", hide = true)]
    pub sparse_size: Option<String>,
    /// qemu-img's rate limit (`-r`): refused.
    #[arg(short = 'r', value_name = "RATE", hide = true)]
    pub rate_limit: Option<String>,
    /// qemu-img's copy offloading (`-C`): refused.
    #[arg(short = 'C', hide = true)]
    pub copy_offload: bool,
    /// qemu-img's `--salvage` (go on past read errors): refused.
    #[arg(long, hide = true)]
    pub salvage: bool,
    /// qemu-img's `--target-image-opts`: refused.
    #[arg(long = "target-image-opts", hide = true)]
    pub target_image_opts: bool,
    /// The source image.
    pub source: PathBuf,
    /// The target image.
    pub target: PathBuf,
}

/// `qcow2 dedup [-p] [-q] [-o OUT] IMAGE`
#[derive(Debug, Args)]
pub struct DedupArgs {
    /// Write a new deduplicated image here instead of changing IMAGE.
    #[arg(short = 'o', value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Show progress (when writing a new image).
    #[arg(short = 'p')]
    pub progress: bool,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// The image.
    pub image: PathBuf,
}

/// `qcow2 measure [--output human|json] [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-l SNAPSHOT] (--size SIZE | FILE)`
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).multiple(false))]
pub struct MeasureArgs {
    /// `-U`.
    #[command(flatten)]
    pub share: ForceShare,
    /// `--output`.
    #[command(flatten)]
    pub output: Output,
    /// `-f FMT`.
    #[command(flatten)]
    pub format: SourceFormat,
    /// Target format.
    #[arg(short = 'O', value_enum, default_value = "raw")]
    pub target_format: ImageFormat,
    /// Creation options of the target (as for `create`; dedup=on measures
    /// the source's unique clusters).
    #[arg(short = 'o', action = clap::ArgAction::Append, value_name = "OPTIONS")]
    pub option_lists: Vec<OptionList>,
    /// Measure a compressed target (`convert -c`): the source's clusters
    /// are compressed to count their size.
    #[arg(short = 'c')]
    pub compress: bool,
    /// Measure the source as it was at this internal snapshot.
    #[arg(short = 'l', value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// Measure a new empty image of this size instead of a source.
    #[arg(long, value_name = "SIZE", group = "what", value_parser = parse_size)]
    pub size: Option<u64>,
    /// The source image.
    #[arg(group = "what")]
    pub file: Option<PathBuf>,
}

/// `qcow2 map [-f FMT] [--output human|json] FILE`
#[derive(Debug, Args)]
pub struct MapArgs {
    /// `-U`.
    #[command(flatten)]
    pub share: ForceShare,
    /// `-f FMT`.
    #[command(flatten)]
    pub format: SourceFormat,
    /// `--output`.
    #[command(flatten)]
    pub output: Output,
    /// The image.
    pub file: PathBuf,
}

/// `qcow2 compare [-f FMT] [-F FMT] [-s] [-p] [-q] A B`
///
/// Exit status as qemu-img: 0 identical, 1 different, 2 on error.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// `-U`.
    #[command(flatten)]
    pub share: ForceShare,
    /// Format of the first image (probed when not given).
    #[arg(short = 'f', value_enum)]
    pub first_format: Option<ImageFormat>,
    /// Format of the second image (probed when not given).
    #[arg(short = 'F', value_enum)]
    pub second_format: Option<ImageFormat>,
    /// Strict: images of different sizes differ.
    #[arg(short = 's')]
    pub strict: bool,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// The first image.
    pub first: PathBuf,
    /// The second image.
    pub second: PathBuf,
}

/// `qcow2 bench [-f FMT] [-t CACHE] [-c COUNT] [-d DEPTH] [-o OFFSET] [-s SIZE] [-S STEP] [-w [--pattern N] [--flush-interval N] [--dup PERCENT]] [-r SEED] [-q] FILE`
///
/// qemu-img bench's options and meaning: COUNT requests of SIZE bytes,
/// DEPTH at a time (threads here, AIO there), from OFFSET, each STEP
/// further, wrapping at the end of the disk. `-r` (ours) picks offsets at
/// random instead; `--dup` (ours) makes that share of writes repeat the
/// content of an earlier one, the rest unique.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// `-f FMT`.
    #[command(flatten)]
    pub format: SourceFormat,
    /// Cache mode of the image file.
    #[arg(short = 't', value_enum, default_value = "writeback")]
    pub cache: SourceCache,
    /// Number of requests.
    #[arg(short = 'c', default_value_t = 75_000)]
    pub count: u64,
    /// Requests in flight at once.
    #[arg(short = 'd', default_value_t = 64)]
    pub depth: u64,
    /// Offset of the first request.
    #[arg(short = 'o', default_value = "0", value_parser = parse_size)]
    pub offset: u64,
    /// Bytes per request.
    #[arg(short = 's', default_value = "4096", value_parser = parse_size)]
    pub size: u64,
    /// Offset increment between requests (default: the request size).
    #[arg(short = 'S', value_parser = parse_size)]
    pub step: Option<u64>,
    /// Write instead of read.
    #[arg(short = 'w')]
    pub write: bool,
    /// Byte value written (qemu-img's default is 0).
    #[arg(long, default_value_t = 0, requires = "write")]
    pub pattern: u8,
    /// Flush after every N requests (0: never; a flush at the end always).
    #[arg(long, default_value_t = 0, requires = "write")]
    pub flush_interval: u64,
    /// Percentage of writes that repeat an earlier write's content; with
    /// it, the other writes carry unique content instead of `--pattern`.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100), requires = "write")]
    pub dup: Option<u8>,
    /// Random offsets (aligned to the request size) from this seed.
    #[arg(short = 'r')]
    pub random: Option<u64>,
    /// `-q`.
    #[command(flatten)]
    pub quiet: Quiet,
    /// The image.
    pub file: PathBuf,
}

/// `serve --discard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiscardArg {
    /// Acknowledge trims, keep the data.
    Ignore,
    /// Deallocate trimmed clusters.
    Unmap,
}

/// `serve --detect-zeroes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DetectZeroesArg {
    /// Writes of zeros are writes.
    Off,
    /// Writes of zeros become zero clusters that keep their allocation.
    On,
    /// Writes of zeros become zero clusters, deallocated when
    /// `--discard=unmap`.
    Unmap,
}

/// `qcow2 serve [-k PATH | -b ADDR -p PORT] [-r] [-x NAME] [-e N] [-t] [--pid-file F] [--discard ..] [--detect-zeroes ..] IMAGE`
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen on this Unix socket instead of TCP.
    #[arg(short = 'k', long = "socket", value_name = "PATH", conflicts_with_all = ["port", "bind"])]
    pub socket: Option<PathBuf>,
    /// TCP port.
    #[arg(short = 'p', long, default_value_t = 10809)]
    pub port: u16,
    /// Address to listen on.
    #[arg(short = 'b', long, default_value = "127.0.0.1")]
    pub bind: String,
    /// Export read-only (writes get EPERM).
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Export name (the default export has the empty name).
    #[arg(short = 'x', long = "export-name", default_value = "")]
    pub export_name: String,
    /// Export description.
    #[arg(short = 'D', long, default_value = "")]
    pub description: String,
    /// Clients served at once.
    #[arg(short = 'e', long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    pub shared: u16,
    /// Keep serving after the last client disconnects.
    #[arg(short = 't', long)]
    pub persistent: bool,
    /// Write the server's process id here once it listens.
    #[arg(long = "pid-file", value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    /// What trims do.
    #[arg(long, value_enum, default_value = "ignore")]
    pub discard: DiscardArg,
    /// What writes of zeros become.
    #[arg(long = "detect-zeroes", value_enum, default_value = "off")]
    pub detect_zeroes: DetectZeroesArg,
    /// Export this persistent bitmap as the `qemu:dirty-bitmap:NAME`
    /// metadata context, as qemu-nbd -B does (repeatable).
    #[arg(short = 'B', long = "bitmap", value_name = "NAME")]
    pub bitmaps: Vec<String>,
    /// Export the `qemu:allocation-depth` metadata context, as qemu-nbd -A
    /// does.
    #[arg(short = 'A', long = "allocation-depth")]
    pub allocation_depth: bool,
    /// Keep freed clusters allocated in the image file instead of
    /// punching holes for them (by default trimmed and otherwise freed
    /// space goes back to the host).
    #[arg(long = "no-hole-punching")]
    pub no_hole_punching: bool,
    /// Image format (only qcow2 is served).
    #[arg(short = 'f', long, value_enum)]
    pub format: Option<Qcow2Only>,
    /// The image.
    pub image: PathBuf,
}

impl AmendArgs {
    /// The `-o` lists merged in command-line order, as qemu-img merges a
    /// repeated `-o` (clap requires at least one).
    pub fn options(&self) -> OptionList {
        OptionList::merged(&self.option_lists).unwrap_or(OptionList(Vec::new()))
    }
}

impl CreateArgs {
    /// The `-o` lists merged in command-line order, as qemu-img merges a
    /// repeated `-o`; `None` when none was given.
    pub fn options(&self) -> Option<OptionList> {
        OptionList::merged(&self.option_lists)
    }
}

impl ConvertArgs {
    /// The `-o` lists merged in command-line order, as qemu-img merges a
    /// repeated `-o`; `None` when none was given.
    pub fn options(&self) -> Option<OptionList> {
        OptionList::merged(&self.option_lists)
    }
}

impl MeasureArgs {
    /// The `-o` lists merged in command-line order, as qemu-img merges a
    /// repeated `-o`; `None` when none was given.
    pub fn options(&self) -> Option<OptionList> {
        OptionList::merged(&self.option_lists)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    fn parse(line: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("qcow2").chain(line.split_whitespace()))
    }

    #[test]
    fn parses_typed_values_and_refuses_unknown_ones() {
        let Command::Convert(c) = parse("convert -p -f raw -O qcow2 -t writeback a b")
            .unwrap()
            .command
        else {
            panic!("not convert")
        };
        assert!(c.progress);
        assert_eq!(c.source_format, Some(ImageFormat::Raw));
        assert_eq!(c.target_format, ImageFormat::Qcow2);
        assert_eq!(c.target_cache, CacheMode::Writeback);
        assert_eq!(
            (c.source.as_path(), c.target.as_path()),
            (std::path::Path::new("a"), std::path::Path::new("b"))
        );
        let Command::Check(c) = parse("check --output=json -r all x").unwrap().command else {
            panic!("not check")
        };
        assert_eq!(c.output.format, OutputFormat::Json);
        assert_eq!(c.repair, Some(RepairArg::All));
        let e = parse("info -f vmdk x").unwrap_err().to_string();
        assert!(e.contains("vmdk"), "{e}");
        assert!(parse("convert -t directsync a b").is_err());
        assert!(parse("map --bogus x").is_err());
    }
}
