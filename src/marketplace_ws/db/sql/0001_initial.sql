-- marketplace-ws: the tables of chat, notifications and the outbox.
--
-- Runs with search_path set to our schema (marketplace_ws by default), so no name here is
-- schema-qualified. User and listing ids are text: the Next.js app's ids are cuid/uuid
-- strings. last_message_id and last_read_message_id are positions in messages, kept
-- without foreign keys: a foreign key from conversations back to messages would make the
-- two tables depend on each other (and the Prisma models with them).

CREATE TABLE conversations (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    listing_id text NULL CHECK (char_length(listing_id) BETWEEN 1 AND 255),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_message_id bigint NULL
);

CREATE INDEX conversations_listing_idx ON conversations (listing_id)
    WHERE listing_id IS NOT NULL;

CREATE TABLE participants (
    conversation_id bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    user_id text NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 255),
    role text NOT NULL CHECK (char_length(role) BETWEEN 1 AND 32),
    last_read_message_id bigint NULL,
    joined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, user_id)
);

-- A user's conversations, and the participant check on subscribe.
CREATE INDEX participants_user_idx ON participants (user_id, conversation_id);

CREATE TABLE messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    -- NULL for system messages (offer accepted, order paid), which the HTTP API posts.
    sender_id text NULL CHECK (char_length(sender_id) BETWEEN 1 AND 255),
    kind text NOT NULL DEFAULT 'user' CHECK (kind IN ('user', 'system')),
    -- A ceiling above any sensible configured limit; the server enforces the real one.
    body text NOT NULL CHECK (char_length(body) BETWEEN 1 AND 65536),
    client_msg_id text NULL CHECK (char_length(client_msg_id) BETWEEN 1 AND 128),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'user') = (sender_id IS NOT NULL)),
    -- message.send is idempotent per sender and client message id.
    UNIQUE (sender_id, client_msg_id)
);

-- History pages: newest first within a conversation.
CREATE INDEX messages_conversation_idx ON messages (conversation_id, id DESC);

CREATE TABLE notifications (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id text NOT NULL CHECK (char_length(user_id) BETWEEN 1 AND 255),
    type text NOT NULL CHECK (char_length(type) BETWEEN 1 AND 100),
    title text NOT NULL CHECK (char_length(title) BETWEEN 1 AND 1000),
    body text NULL CHECK (char_length(body) <= 10000),
    data jsonb NOT NULL DEFAULT '{}',
    idempotency_key text NULL CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
    read_at timestamptz NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key)
);

CREATE INDEX notifications_user_idx ON notifications (user_id, id DESC);
CREATE INDEX notifications_unread_idx ON notifications (user_id, id DESC)
    WHERE read_at IS NULL;

-- The Next.js app inserts (channel, event, data) in its own transaction; the server
-- publishes rows in id order and sets published_at.
CREATE TABLE outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel text NOT NULL CHECK (char_length(channel) BETWEEN 1 AND 255),
    event text NOT NULL CHECK (char_length(event) BETWEEN 1 AND 100),
    data jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz NULL
);

CREATE INDEX outbox_unpublished_idx ON outbox (id) WHERE published_at IS NULL;

-- Wakes the server's LISTEN on commit; a periodic sweep catches what a NOTIFY missed.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('marketplace_ws_outbox', NEW.id::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION outbox_notify();
