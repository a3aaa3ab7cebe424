-- Roles one instance at a time may play (the trainers' traffic plane): a row per role with its
-- holder and when the lease ends. `epoch` grows at every change of holder and is the fencing
-- token: a write made under an older epoch is refused (StoreDB.check_role_fence). A released
-- lease keeps its row (expired), so epochs never repeat.
CREATE TABLE role_leases (
    role text PRIMARY KEY,
    holder text NOT NULL,
    epoch bigint NOT NULL,
    address text NOT NULL DEFAULT '',
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
