-- Job ownership is a lease, so several trainers can share one store: the owner renews the
-- lease of its unfinished jobs (HeartbeatTrainingJobs); another trainer takes a job over only
-- once its lease expired (ClaimTrainingJobs). Jobs left by a trainer from before leases get
-- an expired lease: any trainer may take them over at once, as a restart did before.
ALTER TABLE training_jobs ADD COLUMN lease_expires_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX training_jobs_lease ON training_jobs (lease_expires_at)
    WHERE state IN ('queued', 'running');
