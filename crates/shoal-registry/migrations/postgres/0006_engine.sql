-- The engine replicas run a version on (`shoal model push --engine
-- tract|ort|auto`).
ALTER TABLE versions ADD COLUMN engine TEXT NOT NULL DEFAULT 'tract';
