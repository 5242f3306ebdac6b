/**
 * Capped exponential backoff with jitter, shared by unary retries and stream
 * reconnection.
 */

/** How long to wait between attempts. Every field is optional. */
export interface BackoffOptions {
  /** Delay before the first retry, in ms. */
  readonly initialDelayMs?: number;
  /** Upper bound of any single delay, in ms. */
  readonly maxDelayMs?: number;
  /** Growth factor between consecutive delays. */
  readonly multiplier?: number;
  /** Consecutive failed attempts tolerated before the error is thrown (Infinity: never give up). */
  readonly maxAttempts?: number;
}

/** BackoffOptions with every field filled in. */
export type ResolvedBackoff = Required<BackoffOptions>;

export function resolveBackoff(options: BackoffOptions | undefined, defaults: ResolvedBackoff): ResolvedBackoff {
  return {
    initialDelayMs: options?.initialDelayMs ?? defaults.initialDelayMs,
    maxDelayMs: options?.maxDelayMs ?? defaults.maxDelayMs,
    multiplier: options?.multiplier ?? defaults.multiplier,
    maxAttempts: options?.maxAttempts ?? defaults.maxAttempts,
  };
}

/**
 * The delay before retry number `failures` (1 for the first retry): the capped
 * exponential value, scaled by a random factor in [0.5, 1] so that many clients
 * cut off by the same server restart do not come back in lockstep.
 */
export function backoffDelayMs(failures: number, backoff: ResolvedBackoff): number {
  const exponential = backoff.initialDelayMs * backoff.multiplier ** Math.max(0, failures - 1);
  const capped = Math.min(backoff.maxDelayMs, exponential);
  return capped * (0.5 + Math.random() / 2);
}

/** Resolves after `ms`, or rejects with the signal's reason as soon as it aborts. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) {
      reject(signal.reason);
      return;
    }
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}
