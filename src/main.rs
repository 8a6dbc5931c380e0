use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// tollgate: a reverse-proxy gateway driven by one hot-reloaded gateway.yaml.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The policy file.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Take the listening sockets over from the running instance (graceful upgrade;
    /// then send it SIGQUIT).
    #[arg(short = 'u', long)]
    upgrade: bool,
}

/// The sidecar `inject` and `webhook` add.
#[derive(clap::Args)]
struct SidecarArgs {
    /// The gateway image.
    #[arg(long, default_value = concat!("ghcr.io/tollgate/tollgate:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// One policy ConfigMap for every workload (default: `<workload>-tollgate`;
    /// `inject` generates it when the manifest lacks it).
    #[arg(long = "config-map", value_name = "NAME")]
    config_map: Option<String>,
    /// A native sidecar (`initContainers`, `restartPolicy: Always`; Kubernetes >= 1.29).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    native: bool,
}

impl SidecarArgs {
    fn options(
        self,
        app_port: Option<u16>,
        port: Option<u16>,
        admin_port: Option<u16>,
    ) -> tollgate::inject::Options {
        tollgate::inject::Options {
            image: self.image,
            config_map: self.config_map,
            native: self.native,
            app_port,
            port,
            admin_port,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Run(RunArgs),
    /// Validate a policy file; exit 1 with path:line:column errors if it is invalid.
    Check {
        file: PathBuf,
        /// Also print what a reload from this (old) policy would change.
        #[arg(long, value_name = "OLD")]
        against: Option<PathBuf>,
    },
    /// Print a Kubernetes manifest with the tollgate sidecar added to every workload.
    Inject {
        /// The manifest (`-` or nothing: standard input).
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        file: Option<PathBuf>,
        #[command(flatten)]
        sidecar: SidecarArgs,
        /// The application's port, when its container declares none.
        #[arg(long = "app-port")]
        app_port: Option<u16>,
        /// The gateway's port (default: the first from 8080 no container of the pod
        /// declares).
        #[arg(long)]
        port: Option<u16>,
        /// The admin API's port (default: the first free one from 9901).
        #[arg(long = "admin-port")]
        admin_port: Option<u16>,
    },
    /// Serve the Kubernetes mutating admission webhook that injects the sidecar into
    /// opted-in Pods (`tollgate.dev/inject: enabled`).
    Webhook {
        /// The HTTPS listener the API server calls.
        #[arg(long, default_value = "0.0.0.0:8443")]
        listen: std::net::SocketAddr,
        /// The serving certificate (PEM), read again when it changes.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Its private key (PEM).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Defaults a Pod's `tollgate.dev/image` and `tollgate.dev/config-map`
        /// annotations override.
        #[command(flatten)]
        sidecar: SidecarArgs,
    },
    /// Exit 0 when URL answers 2xx within two seconds, else 1: a container HEALTHCHECK
    /// for images without curl.
    Probe {
        #[arg(default_value = "http://127.0.0.1:9901/healthz")]
        url: String,
    },
    /// Start the demo application pool and the gateway with the bundled policy.
    Demo {
        #[arg(
            short = 'c',
            long = "config",
            value_name = "FILE",
            default_value = "gateway.yaml"
        )]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Check { file, against }) => check(file, against),
        Some(Command::Demo { config }) => {
            tollgate::logs::init();
            report(tollgate::demo::run(config))
        }
        Some(Command::Run(args)) => run(args),
        Some(Command::Inject {
            file,
            sidecar,
            app_port,
            port,
            admin_port,
        }) => {
            let options = sidecar.options(app_port, port, admin_port);
            match inject(file, &options) {
                Ok(injection) => {
                    print!("{}", injection.manifest);
                    for note in injection.notes {
                        eprintln!("tollgate inject: {note}");
                    }
                    ExitCode::SUCCESS
                }
                Err(why) => {
                    eprintln!("tollgate inject: {why}");
                    ExitCode::from(1)
                }
            }
        }
        Some(Command::Webhook {
            listen,
            cert,
            key,
            sidecar,
        }) => {
            tollgate::logs::init();
            report(tollgate::webhook::run(tollgate::webhook::WebhookOptions {
                listen,
                cert,
                key,
                defaults: sidecar.options(None, None, None),
            }))
        }
        Some(Command::Probe { url }) => match probe(&url) {
            Ok(()) => ExitCode::SUCCESS,
            Err(why) => {
                eprintln!("tollgate probe {url}: {why}");
                ExitCode::from(1)
            }
        },
        None => run(cli.run),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let Some(policy_path) = args.config else {
        eprintln!("tollgate: which policy? use `tollgate run -c gateway.yaml`");
        return ExitCode::from(2);
    };
    tollgate::logs::init();
    report(tollgate::server::run(tollgate::server::RunOptions {
        policy_path,
        upgrade: args.upgrade,
    }))
}

fn check(file: PathBuf, against: Option<PathBuf>) -> ExitCode {
    match tollgate::server::check(&file, against.as_deref()) {
        Ok(changes) => {
            if against.is_some() {
                if changes.is_empty() {
                    println!("no changes");
                }
                for change in changes {
                    println!("{change}");
                }
            }
            eprintln!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in errors {
                eprintln!("{error}");
            }
            ExitCode::from(1)
        }
    }
}

fn inject(
    file: Option<PathBuf>,
    options: &tollgate::inject::Options,
) -> Result<tollgate::inject::Injection, String> {
    let manifest = match file.filter(|f| f.as_os_str() != "-") {
        Some(path) => std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        None => std::io::read_to_string(std::io::stdin()).map_err(|e| e.to_string())?,
    };
    tollgate::inject::inject(&manifest, options)
}

/// A plain HTTP/1.0 GET: enough for a loopback health endpoint, no client stack needed.
fn probe(url: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    use std::time::Duration;
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs can be probed")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("no address")?;
    let timeout = Duration::from_secs(2);
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).map_err(|e| e.to_string())?;
    let status = std::str::from_utf8(&head[9..12]).unwrap_or("");
    if status.starts_with('2') {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tollgate: {message}");
            tracing::error!("{message}");
            ExitCode::from(1)
        }
    }
}
