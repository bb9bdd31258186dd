package broker

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/mongo-broker/mongo-broker/clients/go/brokerv1"
)

// Version is this client's version, sent in the gRPC user agent.
const Version = "0.1.0"

const (
	// DefaultTimeout bounds a call whose context has no deadline.
	DefaultTimeout = 30 * time.Second
	// DefaultMaxReceiveMessageBytes lets one whole 16 MiB BSON document
	// (which the broker never splits) through with its protobuf framing.
	DefaultMaxReceiveMessageBytes = 17 * 1024 * 1024
	// DefaultMaxSendMessageBytes matches the broker's default request cap
	// (limits.max_request_bytes, 32 MiB) with room to spare, so that the
	// broker, not the client, names the limit that was hit.
	DefaultMaxSendMessageBytes = 48 * 1024 * 1024
)

type options struct {
	token       string
	timeout     time.Duration
	metadata    []string
	creds       credentials.TransportCredentials
	dialOptions []grpc.DialOption
	retries     RetryPolicy
}

// An Option configures a Client in NewClient.
type Option func(*options)

// WithToken sends "authorization: Bearer <token>" with every call.
func WithToken(token string) Option {
	return func(o *options) { o.token = token }
}

// WithTimeout sets the time limit of calls whose context has no deadline
// (default DefaultTimeout). It must be positive.
func WithTimeout(d time.Duration) Option {
	return func(o *options) { o.timeout = d }
}

// WithMetadata adds gRPC metadata (key, value pairs) to every call.
func WithMetadata(kv ...string) Option {
	return func(o *options) { o.metadata = append(o.metadata, kv...) }
}

// WithTransportCredentials uses TLS (or other credentials) instead of the
// default plaintext, which suits a Unix socket or loopback TCP.
func WithTransportCredentials(creds credentials.TransportCredentials) Option {
	return func(o *options) { o.creds = creds }
}

// WithDialOptions passes extra options to grpc.NewClient; they come after
// the client's own, so they win.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dialOptions = append(o.dialOptions, opts...) }
}

// Client is a connection to one broker. It is safe for concurrent use; make
// one per process and Close it when done.
type Client struct {
	conn     *grpc.ClientConn
	stub     brokerv1.BrokerClient
	target   string
	timeout  time.Duration
	metadata metadata.MD
	retries  RetryPolicy
	retried  *atomic.Int64
}

// ErrNilContext is returned by every method given a nil context.Context, in
// place of the panic that gRPC would give. Pass context.Background() or
// context.TODO() when there is no context at hand.
var ErrNilContext = errors.New("broker: nil Context (use context.Background() or context.TODO())")

// NewClient returns a Client for the broker at target:
// "unix:///path/broker.sock", "unix:/path/broker.sock", a bare absolute
// socket path, or "host:port" (any gRPC target). Like grpc.NewClient, it
// makes no connection: the first call does.
//
// A "dns:///name:port" target is a tier of broker replicas, such as the
// pods behind a headless Kubernetes Service: calls are spread round-robin
// over every address the name resolves to whose health is SERVING, as
// NewClientForAddresses does for a list. Any other target is one broker,
// with gRPC's defaults (one connection, no health checking).
func NewClient(target string, opts ...Option) (*Client, error) {
	normalized, err := normalizeTarget(target)
	if err != nil {
		return nil, err
	}
	var extra []grpc.DialOption
	if isTierTarget(normalized) {
		if err := checkDNSTarget(normalized); err != nil {
			return nil, err
		}
		extra = append(extra, grpc.WithDefaultServiceConfig(tierServiceConfig))
	}
	return newClient(normalized, extra, opts)
}

// newClient makes the Client of a checked target; tier are the dial
// options of a tier, which the caller's WithDialOptions come after.
func newClient(target string, tier []grpc.DialOption, opts []Option) (*Client, error) {
	o := options{timeout: DefaultTimeout, retries: DefaultRetryPolicy}
	for _, opt := range opts {
		opt(&o)
	}
	if o.timeout <= 0 {
		return nil, fmt.Errorf("broker: timeout must be positive, not %v", o.timeout)
	}
	if err := o.retries.validate(); err != nil {
		return nil, err
	}
	if len(o.metadata)%2 != 0 {
		return nil, errors.New("broker: WithMetadata takes key, value pairs")
	}
	md := metadata.Pairs(o.metadata...)
	if o.token != "" {
		md.Set("authorization", "Bearer "+o.token)
	}
	creds := o.creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	dialOptions := append([]grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithUserAgent("mongo-broker-client-go/" + Version),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(DefaultMaxReceiveMessageBytes),
			grpc.MaxCallSendMsgSize(DefaultMaxSendMessageBytes),
		),
	}, tier...)
	dialOptions = append(dialOptions, o.dialOptions...)
	conn, err := grpc.NewClient(target, dialOptions...)
	if err != nil {
		return nil, fmt.Errorf("broker: bad target %q: %w", target, err)
	}
	return &Client{
		conn:     conn,
		stub:     brokerv1.NewBrokerClient(conn),
		target:   target,
		timeout:  o.timeout,
		metadata: md,
		retries:  o.retries,
		retried:  new(atomic.Int64),
	}, nil
}

// normalizeTarget accepts the address forms the other clients accept.
// gRPC itself knows "unix:///abs" and "unix:rel"; "unix:/abs" and a bare
// "/abs" are spelled out as "unix:///abs" so that every form means the same.
func normalizeTarget(target string) (string, error) {
	target = strings.TrimSpace(target)
	switch {
	case target == "":
		return "", errors.New("broker: empty target")
	case strings.HasPrefix(target, "unix://"):
		if !strings.HasPrefix(target, "unix:///") {
			return "", fmt.Errorf("broker: target %q: a unix socket needs an absolute path, as unix:///path", target)
		}
		return target, nil
	case strings.HasPrefix(target, "unix:/"):
		return "unix://" + strings.TrimPrefix(target, "unix:"), nil
	case strings.HasPrefix(target, "/"):
		return "unix://" + target, nil
	}
	return target, nil
}

// Target is the gRPC target the client dials; a client made by
// NewClientForAddresses has its own scheme, followed by the addresses.
func (c *Client) Target() string { return c.target }

// RetryCount is how many retries this client has made since it was
// created, over every call: attempts beyond each call's first (see
// RetryPolicy). Each failed attempt that is retried also shows in the
// final error's Attempts.
func (c *Client) RetryCount() int64 { return c.retried.Load() }

// Close closes the connection; calls in flight fail with Canceled.
func (c *Client) Close() error { return c.conn.Close() }

// Database returns a handle to a database configured on the broker (its
// configured name, which the broker maps to a MongoDB database).
func (c *Client) Database(name string) *Database {
	return &Database{client: c, name: name}
}

// Raw returns the generated gRPC stub, for what this package does not wrap
// (the Extended JSON encodings). Add deadlines and metadata yourself.
func (c *Client) Raw() brokerv1.BrokerClient { return c.stub }

// Ping checks the broker and every configured database. A database that is
// down does not make Ping fail: see PingResult.OK.
func (c *Client) Ping(ctx context.Context) (*PingResult, error) {
	return c.ping(ctx, "")
}

// Stats returns the broker's pool, queue and operation figures for every
// configured database; Database.Stats gives one database's.
func (c *Client) Stats(ctx context.Context) (*StatsResult, error) {
	return c.stats(ctx, "")
}

func (c *Client) ping(ctx context.Context, database string) (*PingResult, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	resp, err := unary(ctx, c, true, c.stub.Ping, &brokerv1.PingRequest{Database: database})
	if err != nil {
		return nil, err
	}
	result := &PingResult{Version: resp.GetVersion()}
	for _, db := range resp.GetDatabases() {
		result.Databases = append(result.Databases, DatabasePing{
			Database: db.GetDatabase(),
			OK:       db.GetOk(),
			RTT:      milliseconds(db.GetRttMs()),
			Error:    db.GetError(),
			Pool: PoolSummary{
				ConnectionsOpen:  db.GetPool().GetConnectionsOpen(),
				ConnectionsInUse: db.GetPool().GetConnectionsInUse(),
				MaxPoolSize:      db.GetPool().GetMaxPoolSize(),
			},
		})
	}
	return result, nil
}

func (c *Client) stats(ctx context.Context, database string) (*StatsResult, error) {
	if ctx == nil {
		return nil, ErrNilContext
	}
	resp, err := unary(ctx, c, true, c.stub.Stats, &brokerv1.StatsRequest{Database: database})
	if err != nil {
		return nil, err
	}
	return statsFromProto(resp), nil
}

// milliseconds turns the proto's float milliseconds into a Duration.
func milliseconds(ms float64) time.Duration {
	return time.Duration(ms * float64(time.Millisecond))
}

// callContext adds the client's metadata and, when ctx has none, the
// default deadline. The deadline becomes the gRPC deadline, which the broker
// turns into MongoDB's client-side operation timeout. ctx is not nil: the
// methods refuse a nil one first.
func (c *Client) callContext(ctx context.Context) (context.Context, context.CancelFunc) {
	if len(c.metadata) > 0 {
		existing, _ := metadata.FromOutgoingContext(ctx)
		ctx = metadata.NewOutgoingContext(ctx, metadata.Join(c.metadata, existing))
	}
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, c.timeout)
}

// WithRequestID returns a context whose calls carry "x-request-id: id"
// (1-64 of A-Za-z0-9._:-). The broker logs it and puts it into the MongoDB
// operation's comment, so the server's slow-query log leads back here.
//
// A nil ctx panics with a message saying so, as context.WithValue does:
// there is no error to return, and a context made up here would drop the
// caller's deadline without a word.
func WithRequestID(ctx context.Context, id string) context.Context {
	if ctx == nil {
		panic(ErrNilContext.Error() + " passed to WithRequestID")
	}
	return metadata.AppendToOutgoingContext(ctx, "x-request-id", id)
}

// PingResult is the broker's version and each pinged database's state.
type PingResult struct {
	Version   string
	Databases []DatabasePing
}

// OK reports whether every pinged database answered.
func (r *PingResult) OK() bool {
	for _, db := range r.Databases {
		if !db.OK {
			return false
		}
	}
	return true
}

// DatabasePing is one database's answer to a ping.
type DatabasePing struct {
	Database string
	OK       bool
	// RTT is the round-trip time of MongoDB's ping command.
	RTT time.Duration
	// Error says why the ping failed; empty when OK.
	Error string
	Pool  PoolSummary
}

// PoolSummary is the broker's connection pool to one database.
type PoolSummary struct {
	ConnectionsOpen  int64
	ConnectionsInUse int64
	MaxPoolSize      int64
}

// Database is a database configured on the broker.
type Database struct {
	client *Client
	name   string
}

// Name is the configured database name.
func (d *Database) Name() string { return d.name }

// Client is the client this database belongs to.
func (d *Database) Client() *Client { return d.client }

// Collection returns a handle to a collection of this database.
func (d *Database) Collection(name string) *Collection {
	return &Collection{db: d, name: name}
}

// Ping pings this database only.
func (d *Database) Ping(ctx context.Context) (*PingResult, error) {
	return d.client.ping(ctx, d.name)
}

// Stats returns this database's figures only.
func (d *Database) Stats(ctx context.Context) (*StatsResult, error) {
	return d.client.stats(ctx, d.name)
}
