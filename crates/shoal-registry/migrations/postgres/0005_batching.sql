-- Dynamic batching of a version's requests on replicas (`shoal model push
-- --max-batch N --batch-delay D`): JSON, 'null' when it does not batch.
ALTER TABLE versions ADD COLUMN batching TEXT NOT NULL DEFAULT 'null';
