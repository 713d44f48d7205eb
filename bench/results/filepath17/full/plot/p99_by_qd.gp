set terminal pngcairo size 1640,960 font 'sans,11'
set output 'p99_by_qd.png'
set multiplot layout 2,2 title 'p99 latency by queue depth (median of rounds, bars min–max; lower is better)' font 'sans,14'
set logscale x 2
set xtics (1,2,4,8,16,32,64)
set xrange [0.7:48]
set offsets 0,0,graph 0.2,0
set grid
set key outside right top
set xlabel 'queue depth (iodepth)'
set ylabel 'p99 latency (ms, log scale)'
set logscale y
set yrange [*:*]
set format y '%g'
set title 'randread'
plot 'randread.dat' index 0 using ($1*0.9202):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ff7f0e' dt 1 title 'lupool-file', \
     'randread.dat' index 1 using ($1*0.9727):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ffbb78' dt 2 title 'base-lupool-file', \
     'randread.dat' index 2 using ($1*1.0281):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#d62728' dt 1 title 'lupool-mem', \
     'randread.dat' index 3 using ($1*1.0867):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#f7b6d2' dt 2 title 'base-lupool-mem'
set title 'randwrite'
plot 'randwrite.dat' index 0 using ($1*0.9202):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ff7f0e' dt 1 title 'lupool-file', \
     'randwrite.dat' index 1 using ($1*0.9727):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ffbb78' dt 2 title 'base-lupool-file', \
     'randwrite.dat' index 2 using ($1*1.0281):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#d62728' dt 1 title 'lupool-mem', \
     'randwrite.dat' index 3 using ($1*1.0867):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#f7b6d2' dt 2 title 'base-lupool-mem'
set title 'randrw70'
plot 'randrw70.dat' index 0 using ($1*0.9202):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ff7f0e' dt 1 title 'lupool-file', \
     'randrw70.dat' index 1 using ($1*0.9727):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ffbb78' dt 2 title 'base-lupool-file', \
     'randrw70.dat' index 2 using ($1*1.0281):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#d62728' dt 1 title 'lupool-mem', \
     'randrw70.dat' index 3 using ($1*1.0867):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#f7b6d2' dt 2 title 'base-lupool-mem'
set title 'paging'
plot 'paging.dat' index 0 using ($1*0.9202):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ff7f0e' dt 1 title 'lupool-file', \
     'paging.dat' index 1 using ($1*0.9727):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#ffbb78' dt 2 title 'base-lupool-file', \
     'paging.dat' index 2 using ($1*1.0281):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#d62728' dt 1 title 'lupool-mem', \
     'paging.dat' index 3 using ($1*1.0867):($5/1000):($6/1000):($7/1000) with yerrorlines lw 2 pt 7 ps 1.1 lc rgb '#f7b6d2' dt 2 title 'base-lupool-mem'
unset multiplot
