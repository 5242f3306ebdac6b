// Starts a real tether-server (the repository's .venv console script) on a free
// loopback port for the integration tests, and stops it by PID.
import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { TetherClient } from "../src/index.js";

/** The server binary: $TETHER_SERVER, else <repo>/.venv/bin/tether-server. */
export const SERVER_BIN =
  process.env["TETHER_SERVER"] ?? fileURLToPath(new URL("../../../.venv/bin/tether-server", import.meta.url));

const READY_TIMEOUT_MS = 120_000;
const STOP_GRACE_MS = 15_000;

/** A port nobody listens on right now (the kernel picks it). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.unref();
    probe.on("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const address = probe.address();
      probe.close(() => (typeof address === "object" && address ? resolve(address.port) : reject(new Error("no port"))));
    });
  });
}

export class TetherServer {
  readonly address: string;
  readonly logPath: string;
  private child: ChildProcess | undefined;

  private constructor(
    readonly port: number,
    readonly dataDir: string,
    private readonly ownsDataDir: boolean,
    private readonly engines: number,
  ) {
    this.address = `127.0.0.1:${port}`;
    this.logPath = join(dataDir, `server-${port}.log`);
  }

  /** Starts a server with its own port and data directory, and waits until it serves. */
  static async start(options: { engines?: number } = {}): Promise<TetherServer> {
    if (!existsSync(SERVER_BIN)) {
      throw new Error(`tether-server not found at ${SERVER_BIN}: run 'make venv' at the repository root (or set TETHER_SERVER)`);
    }
    const dataDir = mkdtempSync(join(tmpdir(), "tether-ts-"));
    const server = new TetherServer(await freePort(), dataDir, true, options.engines ?? 2);
    try {
      await server.restart();
    } catch (error) {
      await server.dispose(); // the error carries the tail of the server's output
      throw error;
    }
    return server;
  }

  /** (Re)starts the process on the same port and data directory; on failure, the process is stopped. */
  async restart(): Promise<void> {
    try {
      await this.launch();
    } catch (error) {
      await this.stop();
      throw error;
    }
  }

  private async launch(): Promise<void> {
    if (this.child) {
      throw new Error("server already running");
    }
    const args = ["--listen", this.address, "--engines", String(this.engines), "--data-dir", this.dataDir];
    const child = spawn(SERVER_BIN, args, { stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    const log = createWriteStream(this.logPath, { flags: "a" });
    child.once("exit", () => log.end());
    let output = "";
    const announced = new Promise<void>((resolve, reject) => {
      const onData = (chunk: Buffer): void => {
        log.write(chunk);
        output += chunk.toString();
        if (output.includes(this.address)) {
          resolve();
        }
      };
      child.stdout?.on("data", onData);
      child.stderr?.on("data", onData);
      child.once("exit", (code, signal) =>
        reject(new Error(`tether-server exited (${code ?? signal}) before it was ready:\n${output.slice(-4000)}`)),
      );
      child.once("error", reject);
    });
    const deadline = Date.now() + READY_TIMEOUT_MS;
    await withTimeout(announced, READY_TIMEOUT_MS, () => `tether-server did not announce ${this.address}:\n${output.slice(-4000)}`);
    // The banner says the port is bound; a successful GetCluster says the services answer.
    const client = new TetherClient(this.address, { timeoutMs: 2000, retry: { maxAttempts: 1 } });
    try {
      for (;;) {
        try {
          await client.cluster();
          return;
        } catch (error) {
          if (Date.now() > deadline) {
            throw new Error(`tether-server never answered GetCluster: ${String(error)}`);
          }
          await new Promise((resolve) => setTimeout(resolve, 200));
        }
      }
    } finally {
      client.close();
    }
  }

  /** SIGTERM, then SIGKILL after 15 s; resolves when the process is gone. */
  async stop(): Promise<void> {
    const child = this.child;
    this.child = undefined;
    if (!child || child.exitCode !== null || child.signalCode !== null) {
      return;
    }
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill("SIGTERM");
    const killer = setTimeout(() => child.kill("SIGKILL"), STOP_GRACE_MS);
    await exited;
    clearTimeout(killer);
  }

  /** Stops the server and removes its data directory. */
  async dispose(): Promise<void> {
    await this.stop();
    if (this.ownsDataDir && !process.env["TETHER_KEEP_DATA"]) {
      rmSync(this.dataDir, { recursive: true, force: true });
    }
  }

  /** The server's output so far (for failure messages). */
  log(): string {
    return existsSync(this.logPath) ? readFileSync(this.logPath, "utf8") : "";
  }
}

async function withTimeout<T>(promise: Promise<T>, ms: number, message: () => string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(message())), ms);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}
