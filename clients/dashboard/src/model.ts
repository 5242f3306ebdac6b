// tether.v1 messages in protobuf's JSON mapping (the fields the dashboard reads), and the
// dashboard's view of the task table, kept in step with the event stream.

export interface InterruptRecord {
  requestedBy?: string;
  reason?: string;
  requestTime?: string;
  cause?: string;
  stage?: string;
  finalStage?: string;
}

export interface ResourceReport {
  rssBeforeBytes?: string;
  rssAfterBytes?: string;
  gpuAllocatedBeforeBytes?: string;
  gpuAllocatedAfterBytes?: string;
  leftoverChildren?: number;
  reclaimed?: boolean;
  engineRecycled?: boolean;
  summary?: string;
}

export interface TaskAttempt {
  attempt?: number;
  engineId?: number;
  startTime?: string;
  endTime?: string;
  ending?: string;
  reason?: string;
  message?: string;
  endedBy?: string;
}

export interface Task {
  name: string;
  task: string;
  args?: Record<string, unknown>;
  state: string;
  labels?: Record<string, string>;
  priority?: number;
  engineId?: number;
  attempt?: number;
  createTime?: string;
  startTime?: string;
  endTime?: string;
  progress?: { fraction?: number; message?: string };
  output?: string;
  interrupt?: InterruptRecord;
  result?: unknown;
  error?: { reason?: string; message?: string; type?: string; traceback?: string };
  resources?: ResourceReport;
  revision?: string;
  owner?: string;
  preemptible?: boolean;
  attempts?: TaskAttempt[];
}

export interface TaskEvent {
  type: string;
  task: Task;
  eventTime?: string;
  outputChunk?: string;
  revision?: string;
}

export interface StreamResponse {
  resumeToken?: string;
  taskEvent?: TaskEvent;
  checkpoint?: { revision?: string };
}

export interface Engine {
  id?: number;
  host?: string;
  state?: string;
  currentTask?: string;
  queuedTasks?: number;
  tasksDone?: string;
  tags?: string[];
}

export const STATES = [
  "PENDING",
  "RUNNING",
  "INTERRUPTING",
  "SUCCEEDED",
  "FAILED",
  "INTERRUPTED",
  "TIMED_OUT",
  "CANCELLED",
] as const;

export const TERMINAL = new Set(["SUCCEEDED", "FAILED", "INTERRUPTED", "TIMED_OUT", "CANCELLED"]);

/** "TASK_STATE_RUNNING" -> "RUNNING" (the JSON mapping spells enum values in full). */
export function short(value: string | undefined, prefix: string): string {
  return value?.startsWith(prefix) ? value.slice(prefix.length) : (value ?? "");
}

export const stateOf = (t: Task): string => short(t.state, "TASK_STATE_");

export function seconds(timestamp: string | undefined): number | undefined {
  if (!timestamp) return undefined;
  const ms = Date.parse(timestamp);
  return Number.isNaN(ms) ? undefined : ms / 1000;
}

/** A finished task as the charts need it. */
export interface Finish {
  at: number;
  state: string;
  interruptLatency?: number;
  stage?: string;
}

function finishOf(t: Task): Finish {
  const end = seconds(t.endTime) ?? Date.now() / 1000;
  const requested = seconds(t.interrupt?.requestTime);
  return {
    at: end,
    state: stateOf(t),
    interruptLatency: requested !== undefined ? end - requested : undefined,
    stage: short(t.interrupt?.finalStage, "ESCALATION_STAGE_") || undefined,
  };
}

/**
 * The task table and the stream's cursor. ``apply`` takes stream responses in order and
 * ignores an event it has already seen (revision at or below the last one), so a resumed
 * stream can never show an event twice; ``revisions`` lists every event applied, which
 * lets anyone (the browser test) check there was no gap and no duplicate.
 */
export class TaskTable {
  readonly tasks = new Map<string, Task>();
  readonly revisions: number[] = [];
  readonly finishes: Finish[] = [];
  resumeToken = "";
  lastRevision = 0;
  listeners: ((event: TaskEvent) => void)[] = [];

  reset(tasks: Task[], resumeToken: string): void {
    this.tasks.clear();
    this.finishes.length = 0;
    for (const t of tasks) {
      this.tasks.set(t.name, t);
      if (TERMINAL.has(stateOf(t))) this.finishes.push(finishOf(t));
    }
    this.finishes.sort((a, b) => a.at - b.at);
    this.resumeToken = resumeToken;
    this.lastRevision = 0;
  }

  apply(message: StreamResponse): void {
    const event = message.taskEvent;
    if (event) {
      const revision = Number(event.revision ?? event.task.revision ?? 0);
      if (revision <= this.lastRevision) return; // replayed after a reconnect: seen already
      this.lastRevision = revision;
      this.revisions.push(revision);
      this.update(event);
    } else if (message.checkpoint?.revision) {
      this.lastRevision = Math.max(this.lastRevision, Number(message.checkpoint.revision));
    }
    if (message.resumeToken) this.resumeToken = message.resumeToken;
  }

  private update(event: TaskEvent): void {
    const incoming = event.task;
    const known = this.tasks.get(incoming.name);
    // Non-terminal snapshots carry no output (each chunk comes as its own event).
    const output = incoming.output ?? "";
    const merged: Task = { ...incoming, output: output || (known?.output ?? "") };
    if (event.type === "TASK_EVENT_TYPE_OUTPUT" && event.outputChunk) {
      merged.output = (known?.output ?? "") + event.outputChunk;
    }
    const state = stateOf(incoming);
    if (TERMINAL.has(state) && !(known && TERMINAL.has(stateOf(known)))) {
      this.finishes.push(finishOf(incoming));
    }
    this.tasks.set(incoming.name, merged);
    for (const listener of this.listeners) listener(event);
  }

  counts(): Map<string, number> {
    const counts = new Map<string, number>(STATES.map((s) => [s, 0]));
    for (const t of this.tasks.values()) {
      const s = stateOf(t);
      counts.set(s, (counts.get(s) ?? 0) + 1);
    }
    return counts;
  }
}
