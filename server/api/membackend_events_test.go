package api

import (
	"context"
	"time"
)

// memBackend also serves the optional stores (events, alerts, FFDC), so
// that routeTable covers their routes.
var (
	_ EventSource = (*memBackend)(nil)
	_ AlertStore  = (*memBackend)(nil)
	_ FFDCStore   = (*memBackend)(nil)
)

func (b *memBackend) Events(uint64, int) ([]Event, error) {
	return []Event{{Seq: 1, Time: time.Unix(1, 0), Kind: "LUCreated", LU: "a"}}, nil
}

func (b *memBackend) LastEventSeq() uint64 { return 1 }

func (b *memBackend) EventsChanged() <-chan struct{} { return make(chan struct{}) }

func (b *memBackend) AppendEvent(ctx context.Context, _ Event) error {
	err := b.enter(ctx, "AppendEvent", true)
	b.mu.Unlock()
	return err
}

func (b *memBackend) AddSubscriber(ctx context.Context, req SubscribeRequest) (Subscriber, error) {
	err := b.enter(ctx, "AddSubscriber", true)
	b.mu.Unlock()
	return Subscriber{ID: req.ID, To: req.To}, err
}

func (b *memBackend) RemoveSubscriber(ctx context.Context, _ string) error {
	err := b.enter(ctx, "RemoveSubscriber", true)
	b.mu.Unlock()
	return err
}

func (b *memBackend) Subscribers(ctx context.Context) ([]Subscriber, error) {
	err := b.enter(ctx, "Subscribers", true)
	b.mu.Unlock()
	return nil, err
}

func (b *memBackend) PoolAlerts(ctx context.Context) (PoolAlerts, error) {
	_ = b.enter(ctx, "PoolAlerts", false)
	b.mu.Unlock()
	return PoolAlerts{ThresholdPercent: 80, CriticalPercent: 90}, nil
}

func (b *memBackend) SetPoolAlerts(ctx context.Context, a PoolAlerts) (PoolAlerts, error) {
	err := b.enter(ctx, "SetPoolAlerts", true)
	b.mu.Unlock()
	return a, err
}

func (b *memBackend) CollectFFDC(ctx context.Context, _ FFDCRequest) (FFDCInfo, error) {
	err := b.enter(ctx, "CollectFFDC", true)
	b.mu.Unlock()
	return FFDCInfo{ID: "f1"}, err
}

func (b *memBackend) ListFFDC(ctx context.Context) ([]FFDCInfo, error) {
	_ = b.enter(ctx, "ListFFDC", false)
	b.mu.Unlock()
	return nil, nil
}

func (b *memBackend) GetFFDC(ctx context.Context, id string) (FFDCInfo, []byte, error) {
	_ = b.enter(ctx, "GetFFDC", false)
	b.mu.Unlock()
	return FFDCInfo{ID: id, Complete: true}, []byte("gz"), nil
}

func (b *memBackend) FFDCParts(ctx context.Context, _, _, _ string) ([]byte, error) {
	_ = b.enter(ctx, "FFDCParts", false)
	b.mu.Unlock()
	return []byte("gz"), nil
}

func (b *memBackend) StoreFFDC(ctx context.Context, _ FFDCInfo, _ []byte) error {
	err := b.enter(ctx, "StoreFFDC", true)
	b.mu.Unlock()
	return err
}
