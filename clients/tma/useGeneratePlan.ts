// useGeneratePlan: the Mini App's "Generate Plan" button, from the tap to the plan on screen.
//
// The Mini App talks to PostgREST (InsForge or Supabase) as role `authenticated`, with the
// user's JWT. It inserts one `plan_requests` row and then only reads that row back: row-level
// security lets it read its own rows and nothing else, and it never updates anything.
//
// While the model writes the plan, the worker copies each finished step into the row's
// `progress` column, so the screen can show step 1 about a second after the model wrote it
// instead of the whole plan at the end. The hook polls every second while the request is
// `processing` (every 3 s while it waits as `pending`) and stops on `completed`, `failed`,
// unmount, or after TIMEOUT_MS.
//
// Realtime alternative (where the backend offers one): Supabase Realtime's `postgres_changes`
// applies row-level security to every change it sends, so a client may subscribe to its own row
// instead of polling:
//
//   supabase
//     .channel(`plan_request:${id}`)
//     .on('postgres_changes',
//         { event: 'UPDATE', schema: 'public', table: 'plan_requests', filter: `id=eq.${id}` },
//         (change) => queryClient.setQueryData(requestKey(id), change.new as PlanRequest))
//     .subscribe();
//
// (The table must be in the `supabase_realtime` publication.) Keep a slow poll as well: a
// subscription that drops silently must not leave the spinner turning forever.
//
// Traces: each tap sends a W3C `traceparent` with its insert (a new trace id and span id from
// crypto.getRandomValues, unless the app passes its own tracer's). Where the worker exports
// traces (OTEL_EXPORTER_OTLP_ENDPOINT), every attempt at the request (its claim, the model
// call, the stored plan) is a child of that span, so one trace id finds the whole story.

import type { PostgrestClient } from '@supabase/postgrest-js';
import { useMutation, useQuery, useQueryClient } from '@tanstack/react-query';
import { useEffect, useState } from 'react';

export type ActionType =
  | 'linkedin_like'
  | 'linkedin_comment'
  | 'linkedin_connect'
  | 'linkedin_dm'
  | 'email_outreach'
  | 'mutual_intro'
  | 'followup_message'
  | 'meeting_request';

export type PlanStep = {
  step_id: number; // 1..N, in order
  action_type: ActionType;
  description: string; // what to do, never empty
  suggested_text: string | null; // a draft to send; always null for linkedin_comment
  timing: string; // human form of delay_days, e.g. "Day 4"
  delay_days: number; // integer 0..90, never decreasing
  status: 'pending';
  completed_at: null;
};

export type RequestStatus = 'pending' | 'processing' | 'completed' | 'failed';

/** The steps the model has finished so far, while the request is `processing`. */
export type PlanProgress = {
  started_at: string; // when the model started answering
  steps: PlanStep[]; // each valid on its own; the whole plan is checked at the end
};

export type PlanRequest = {
  id: number;
  lead_id: number;
  telegram_id: number;
  status: RequestStatus;
  result:
    | null
    | { plan: PlanStep[]; step_count: number }
    | { error: string }
    | { previous_error: string };
  progress: PlanProgress | null;
  traceparent: string | null; // the W3C trace context sent with the insert, if any
  attempts: number;
  created_at: string;
  updated_at: string;
};

// One string literal: postgrest-js types each row from it.
const COLUMNS =
  'id, lead_id, telegram_id, status, result, progress, traceparent, attempts, created_at, updated_at';
const POLL_PROCESSING_MS = 1_000;
const POLL_PENDING_MS = 3_000;
const TIMEOUT_MS = 90_000;
const UNIQUE_VIOLATION = '23505'; // the lead already has a pending or processing request

export class PlanError extends Error {}

export const requestKey = (id: number | null) => ['planRequest', id] as const;

function randomHex(bytes: number): string {
  const values = crypto.getRandomValues(new Uint8Array(bytes));
  return Array.from(values, (byte) => byte.toString(16).padStart(2, '0')).join('');
}

/** A new W3C traceparent: version 00, a random trace id and span id, sampled (flags 01). */
export function newTraceparent(): string {
  let traceId = randomHex(16);
  let spanId = randomHex(8);
  // An all-zero id is invalid (the database refuses it); with random bytes, all but never.
  while (/^0+$/.test(traceId)) traceId = randomHex(16);
  while (/^0+$/.test(spanId)) spanId = randomHex(8);
  return `00-${traceId}-${spanId}-01`;
}

/** Insert a request or, when the lead already has an active one, return that one. */
async function startRequest(
  db: PostgrestClient,
  leadId: number,
  telegramId: number,
  traceparent: string,
): Promise<PlanRequest> {
  for (let tries = 0; tries < 2; tries++) {
    const inserted = await db
      .from('plan_requests')
      .insert({ lead_id: leadId, telegram_id: telegramId, traceparent })
      .select(COLUMNS)
      .single();
    if (!inserted.error) return inserted.data as PlanRequest;
    if (inserted.error.code !== UNIQUE_VIOLATION) {
      throw new PlanError(inserted.error.message); // a refused insert says which rule it broke
    }
    const active = await db
      .from('plan_requests')
      .select(COLUMNS)
      .eq('lead_id', leadId)
      .in('status', ['pending', 'processing'])
      .order('id', { ascending: false })
      .limit(1)
      .maybeSingle();
    if (active.error) throw new PlanError(active.error.message);
    if (active.data) return active.data as PlanRequest;
    // It finished between our insert and our read: insert again.
  }
  throw new PlanError('Could not start a plan for this lead. Please try again.');
}

async function readRequest(
  db: PostgrestClient,
  id: number,
  signal: AbortSignal,
): Promise<PlanRequest> {
  const read = await db
    .from('plan_requests')
    .select(COLUMNS)
    .eq('id', id)
    .abortSignal(signal)
    .single();
  if (read.error) throw new PlanError(read.error.message);
  return read.data as PlanRequest;
}

/** How long until the next read: fast while the model writes, slow while queued, then never. */
export function pollInterval(row: PlanRequest | undefined): number | false {
  if (row === undefined || row.status === 'processing') return POLL_PROCESSING_MS;
  if (row.status === 'pending') return POLL_PENDING_MS;
  return false;
}

/** What to show: the final plan, else the steps written so far (possibly none). */
export function visibleSteps(row: PlanRequest | undefined): PlanStep[] {
  if (row === undefined) return [];
  if (row.status === 'completed' && row.result !== null && 'plan' in row.result) {
    return row.result.plan;
  }
  if (row.status === 'processing' && row.progress !== null) return row.progress.steps;
  return [];
}

export type GeneratePlan = {
  generate: () => void;
  status: RequestStatus | null;
  isGenerating: boolean;
  steps: PlanStep[]; // partial while generating, the whole plan once completed
  plan: PlanStep[] | null; // the validated plan, only once completed
  error: string | null;
};

/**
 * Start a plan for `leadId` and follow it to the end.
 *
 * `db` is a PostgREST client carrying the user's JWT: `new PostgrestClient(restUrl, { headers:
 * { apikey, Authorization: `Bearer ${jwt}` } })`, or `supabase.schema('public')` with
 * supabase-js (InsForge's and Supabase's clients are built on this one).
 *
 * `traceparent` makes the W3C trace context each tap sends: by default a new trace
 * (`newTraceparent`); an app with its own tracer passes one that returns its active span's.
 */
export function useGeneratePlan(
  db: PostgrestClient,
  leadId: number,
  telegramId: number,
  traceparent: () => string = newTraceparent,
): GeneratePlan {
  const queryClient = useQueryClient();
  const [requestId, setRequestId] = useState<number | null>(null);
  const [timedOut, setTimedOut] = useState(false);

  const start = useMutation({
    mutationKey: ['generatePlan', leadId],
    mutationFn: () => startRequest(db, leadId, telegramId, traceparent()),
    // The row is read again at once rather than seeded from the insert: a worker claims it
    // within milliseconds, and a `processing` row is polled every second, not every 3 s.
    onSuccess: (row) => {
      setTimedOut(false);
      setRequestId(row.id);
    },
  });

  // Unmounting removes the query's observer, which stops the polling; the request itself goes
  // on in the worker, and the next tap finds it (completed, or still active).
  const request = useQuery({
    queryKey: requestKey(requestId),
    queryFn: ({ signal }) => readRequest(db, requestId as number, signal),
    enabled: requestId !== null && !timedOut,
    refetchInterval: (query) => pollInterval(query.state.data),
    refetchIntervalInBackground: false,
    staleTime: POLL_PROCESSING_MS / 2,
  });
  const row = request.data;
  const finished = row?.status === 'completed' || row?.status === 'failed';

  useEffect(() => {
    if (requestId === null || finished) return;
    const timer = setTimeout(() => setTimedOut(true), TIMEOUT_MS);
    return () => clearTimeout(timer);
  }, [requestId, finished]);

  // Completed or failed, the lead row may have changed (plan, next follow-up): refetch it.
  useEffect(() => {
    if (finished) void queryClient.invalidateQueries({ queryKey: ['lead', leadId] });
  }, [finished, leadId, queryClient]);

  let error: string | null = null;
  if (start.error) error = start.error.message;
  else if (row?.status === 'failed' && row.result !== null && 'error' in row.result) {
    error = row.result.error;
  } else if (timedOut && !finished) {
    error = 'This is taking longer than usual. Tap again in a minute to check.';
  } else if (request.error) error = request.error.message;

  const steps = visibleSteps(row);
  return {
    generate: () => start.mutate(),
    status: row?.status ?? null,
    isGenerating: start.isPending || (requestId !== null && !finished && !timedOut),
    steps,
    plan: row?.status === 'completed' ? steps : null,
    error,
  };
}
