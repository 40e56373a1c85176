-- A stateful model's state: input fed from output at the next step of a
-- sequence (`shoal model push --state h=hn`).
ALTER TABLE versions ADD COLUMN state TEXT NOT NULL DEFAULT '{}';
