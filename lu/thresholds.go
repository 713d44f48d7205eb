package lu

// Thresholds returns the pool's usage thresholds in percent of capacity
// (used bytes, file system wide): Status reports LevelWarn from warn on,
// LevelCritical from critical on. Immutable after OpenPool.
func (p *Pool) Thresholds() (warnPercent, criticalPercent float64) {
	return p.opts.WarnPercent, p.opts.CriticalPercent
}
