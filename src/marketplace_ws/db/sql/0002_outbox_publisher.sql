-- marketplace-ws: what the outbox publisher needs of the outbox (docs/outbox.rst).
--
-- A row the server cannot publish (a channel of an unknown kind, data that is not a JSON
-- object, an event the broker refuses) is marked failed_at with the reason in error,
-- instead of holding back every row after it. It is not published_at: it was not
-- published. Clearing failed_at and error puts it back in the queue.
ALTER TABLE outbox
    ADD COLUMN failed_at timestamptz NULL,
    ADD COLUMN error text NULL CHECK (char_length(error) <= 1000),
    ADD CONSTRAINT outbox_failure_has_error CHECK ((failed_at IS NULL) = (error IS NULL)),
    ADD CONSTRAINT outbox_published_or_failed CHECK (published_at IS NULL OR failed_at IS NULL);

-- The app's mistakes fail the app's own INSERT, where its developer sees them, rather
-- than a row the server can only mark failed. The channel check is the shape kind:id
-- with the characters an id may hold (marketplace_ws.channels.ID_PATTERN); whether the
-- kind exists is the server's to say. NOT VALID: the checks hold for every new row
-- without refusing to migrate a table that already holds older ones (the publisher
-- marks those failed instead).
ALTER TABLE outbox
    ADD CONSTRAINT outbox_data_object CHECK (jsonb_typeof(data) = 'object') NOT VALID,
    ADD CONSTRAINT outbox_channel_name
        CHECK (channel ~ '^[a-z]{1,32}:[A-Za-z0-9_.:@|-]{1,128}$') NOT VALID;

-- The queue the publisher claims from, in id order; failed rows leave it.
DROP INDEX outbox_unpublished_idx;
CREATE INDEX outbox_pending_idx ON outbox (id)
    WHERE published_at IS NULL AND failed_at IS NULL;
