-- The W3C traceparent of the evaluation that raised an alert ('' when tracing was off), so its
-- delivery and the retrain it asks for continue the evaluation's trace.
ALTER TABLE alerts ADD COLUMN traceparent text NOT NULL DEFAULT '';
