// GeneratePlanButton: the button, a spinner, and the steps as they arrive (see useGeneratePlan).

import type { PostgrestClient } from '@supabase/postgrest-js';
import { useGeneratePlan } from './useGeneratePlan';

type Props = { db: PostgrestClient; leadId: number; telegramId: number };

export function GeneratePlanButton({ db, leadId, telegramId }: Props) {
  const { generate, isGenerating, steps, error } = useGeneratePlan(db, leadId, telegramId);
  return (
    <div className="generate-plan">
      <button type="button" onClick={generate} disabled={isGenerating} aria-busy={isGenerating}>
        {isGenerating ? (
          <>
            <span className="spinner" aria-hidden="true" /> Generating…
          </>
        ) : (
          'Generate Plan'
        )}
      </button>
      {steps.length > 0 && (
        // While generating these are the steps finished so far; the list only grows.
        <ol className="generate-plan__steps" aria-live="polite">
          {steps.map((step) => (
            <li key={step.step_id}>
              <strong>{step.timing}</strong> {step.description}
              {step.suggested_text !== null && <blockquote>{step.suggested_text}</blockquote>}
            </li>
          ))}
        </ol>
      )}
      {error && !isGenerating && (
        <p className="generate-plan__error" role="alert">
          {error}
        </p>
      )}
    </div>
  );
}
