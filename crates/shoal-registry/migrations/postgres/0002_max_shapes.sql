-- Bounds on request shapes per version (`shoal model push --max-shape`).
ALTER TABLE versions ADD COLUMN max_shapes TEXT NOT NULL DEFAULT '{}';
